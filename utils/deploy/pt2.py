"""torch.export archives (.pt2): writing one with the artifact metadata, and opening one a user hands us safely.

Why a check before `torch.export.load`: its loader is not weights_only. Read in torch 2.14.1's
torch/export/pt2_archive/_package.py and torch/_export/serde/serialize.py, a .pt2 can make it
- unpickle: a weight or constant marked `use_pickle` is read with `torch.load(weights_only=False)`, custom and
  opaque constants with `torch._C._pickle_load_obj` / `pickle.loads`, and the sample inputs fall back to
  `weights_only=False` when `weights_only=True` fails;
- load native code: an AOTInductor package (`data/aotinductor/`) is a shared library;
- evaluate text: symbolic shape expressions go through `sympy.sympify` (which calls eval), and `guards_code` is
  compiled into a Python function by `ExportedProgram.module()` (unless `check_guards=False`);
- call any attribute of `torch`, `operator` or `math` named as a graph node's target.
`check_archive` refuses all of these before torch reads the file (only the entries a plain `torch.export.save` of a
float network writes; no pickled payload but the sample inputs, which must load with `weights_only=True`; node targets
in `torch.ops.aten` or a few `operator` functions; shape expressions made of shape symbols, integers and arithmetic),
and `load_program` builds the module with `check_guards=False`. That is a check of what these files are, not a
sandbox: torch's own docs say to never load a .pt2 from an untrusted source; prefer ONNX for files from elsewhere.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from utils.deploy.metadata import PT2_FORMAT_FILE, TORCHSCRIPT_METADATA_FILE, decode_metadata_json
from utils.errors import InputError

PT2_METADATA_FILE = TORCHSCRIPT_METADATA_FILE  # <root>/extra/metadata.json, as in TorchScript archives
# every entry torch.export.save writes for one float program (weights and tensor constants as raw bytes)
ALLOWED_ENTRIES = re.compile(r"(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                             r"|extra/[\w.-]+|models/model\.json|data/sample_inputs/model\.pt"
                             r"|data/weights/(model_weights_config\.json|weight_\d+)"
                             r"|data/constants/(model_constants_config\.json|tensor_\w+))")
ATEN_TARGET = re.compile(r"torch\.ops\.aten\.(?!__)\w+\.(?!__)\w+")  # op.overload; no dunder attribute walks
SAFE_OPERATOR_TARGETS = {f"_operator.{n}" for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg",
                                                     "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_")}
SYMBOL = re.compile(r"[su]\d+")  # shape symbols (s0, s1, ...; u0 for unbacked ones)
QUOTED_SYMBOL = re.compile(r"'[su]\d+'")  # as in Symbol('s0', positive=True, integer=True)
SYMPY_NAMES = {"Symbol", "Integer", "Add", "Mul", "Pow", "FloorDiv", "ModularIndexing", "PythonMod", "Mod", "CleanDiv",
               "CeilToInt", "FloorToInt", "IntTrueDiv", "Max", "Min", "Eq", "Ne", "Le", "Lt", "Ge", "Gt", "oo", "True",
               "False", "positive", "integer", "nonnegative"}
EXPR_CHARS = re.compile(r"[\w\s+\-*/(),<>=!]*")  # no quotes (but a symbol's name), dots, brackets or attribute access


def _refuse(path: Path, why: str) -> InputError:
    return InputError(f"{path}: refused to load this .pt2 archive: {why}; only archives written by export.py --engine pt2 "
                      "(torch.export.save of a float network) are opened, because torch.export.load can run code from "
                      "other ones (see docs/deploy.md)")


def _expressions(node, out: list[str]) -> None:
    """Every symbolic-expression string in the serialized program (keys `expr_str`) — what sympify would parse."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr_str" and isinstance(value, str):
                out.append(value)
            else:
                _expressions(value, out)
    elif isinstance(node, list):
        for value in node:
            _expressions(value, out)


def _safe_expression(expr: str) -> bool:
    """Plain integer arithmetic of sympy's on shape symbols: nothing sympify's eval could turn into a call of ours."""
    plain = QUOTED_SYMBOL.sub("s0", expr)
    return bool(EXPR_CHARS.fullmatch(plain)) and all(SYMBOL.fullmatch(name) or name in SYMPY_NAMES
                                                    for name in re.findall(r"[A-Za-z_]\w*", plain))


def check_archive(path: str | Path) -> None:
    """Refuse (InputError naming why) a .pt2 that could make torch.export.load unpickle, load native code or evaluate
    text; see the module docstring. Reads the zip with zipfile and json; the sample inputs with weights_only=True."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"cannot read {path} as a .pt2 archive: {e}") from None
    with zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        roots = {n.split("/", 1)[0] for n in names}
        if len(roots) != 1 or any("/" not in n for n in names):
            raise _refuse(path, "its files are not under one archive folder")
        root = roots.pop()
        for name in names:
            if not ALLOWED_ENTRIES.fullmatch(name[len(root) + 1:]):
                raise _refuse(path, f"it holds {name[len(root) + 1:]!r}, which torch.export.save does not write for a "
                                    "float network (AOTInductor code, pickled objects or another program)")
        try:
            if zf.read(f"{root}/{PT2_FORMAT_FILE}").strip() != b"pt2":
                raise _refuse(path, "its archive_format is not pt2")
            program = json.loads(zf.read(f"{root}/models/model.json"))
            configs = [json.loads(zf.read(f"{root}/data/{kind}/model_{kind}_config.json")).get("config", {})
                       for kind in ("weights", "constants")]
            sample = zf.read(f"{root}/data/sample_inputs/model.pt")
        except KeyError as e:
            raise _refuse(path, f"it lacks {e.args[0]}") from None
        except (ValueError, AttributeError) as e:
            raise _refuse(path, f"a JSON entry is damaged ({e})") from None
    for config in configs:
        if any(not isinstance(meta, dict) or meta.get("use_pickle") is not False for meta in config.values()):
            raise _refuse(path, "a weight or constant is stored as a pickle")
    try:
        torch.load(io.BytesIO(sample), weights_only=True)  # what torch tries first; its fallback would unpickle anything
    except Exception as e:  # torch.load raises UnpicklingError, RuntimeError, ... on a refused payload
        raise _refuse(path, f"its sample inputs do not load with weights_only=True ({type(e).__name__})") from None
    graph = program.get("graph_module", {}).get("graph", {}) if isinstance(program, dict) else {}
    targets = {n.get("target") for n in graph.get("nodes", []) if isinstance(n, dict)}
    bad = sorted(str(t) for t in targets if not (isinstance(t, str) and (ATEN_TARGET.fullmatch(t) or t in SAFE_OPERATOR_TARGETS)))
    if bad:
        raise _refuse(path, f"its graph calls {bad[0]!r}, not an ATen operator")
    expressions: list[str] = []
    _expressions(program, expressions)
    ranges = program.get("range_constraints")
    expressions += list(ranges) if isinstance(ranges, dict) else []  # their keys are parsed by sympify too
    unsafe = next((e for e in expressions if not _safe_expression(e)), None)
    if unsafe is not None:
        raise _refuse(path, f"a shape expression is not plain arithmetic on shape symbols: {unsafe[:60]!r}")


def save_program(module: nn.Module, path: Path, metadata: dict[str, str], example: torch.Tensor, dynamic_size: bool) -> None:
    """torch.export.export with a dynamic batch (and H/W with `dynamic_size`), saved with the metadata as the extra
    file metadata.json."""
    dims = {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    program = torch.export.export(module, (example,), dynamic_shapes=(dims,))
    torch.export.save(program, str(path), extra_files={PT2_METADATA_FILE: json.dumps(metadata, indent=1)})


def load_program(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """check_archive, then torch.export.load; the program as a module on `device` and its decoded metadata."""
    path = Path(path)
    check_archive(path)
    extra = {PT2_METADATA_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as e:  # the deserializer raises RuntimeError, AssertionError, SerializeError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InputError(f"cannot load .pt2 file {path}: {type(e).__name__}: {first[:200]} (written by another torch "
                         "version? re-export it with export.py --engine pt2)") from None
    text = extra[PT2_METADATA_FILE]
    meta = decode_metadata_json(text, str(path)) if text else {}
    module = program.module(check_guards=False).to(device)  # no guards_code compiled: input shapes are checked by us
    return module, meta
