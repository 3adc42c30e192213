"""Folder prediction throughput: predict.py's loop against raw ONNX Runtime on the same batches.

Two measurements per model, in the same run, on the same ONNX file:
  loop      utils/deploy/predict.run_prediction, exactly what `predict.py --image FOLDER --output rows.csv` runs:
            list the folder, decode each JPEG in --num_workers threads, the shared eval transform (resize shorter
            side, centre crop, normalise), batches of --batch_size through ONNX Runtime, top-5 rows streamed to a CSV
            (written through a temporary name and renamed). Images/s = images / wall time of the whole call.
  raw ORT   InferenceSession.run alone on batches of the same preprocessed images (up to --raw_images of them,
            decoded beforehand and cycled until as many images as the folder has were run), in a session with
            ONNX Runtime's default options. Images/s = images / time spent in session.run.
"ratio" = loop / raw ORT: the share of the model's own speed that folder prediction keeps (goal: >= 0.8). The loop
runs as predict.py runs it: ONNX Runtime's idle threads sleep instead of spinning while decoding threads need the
cores; "ratio, ORT threads spinning" measures the loop with ORT's default spinning, to show what that choice buys.
"decode only" is the thread pool decoding and preprocessing the folder with no model, for context.

The folder: --num_images JPEGs of --width x --height at --quality, made once (reused when the folder already
holds them): a random crop of matplotlib's sample photograph grace_hopper.jpg (real photo structure), blended
with rendered shapes on a colour gradient, plus pixel noise, so JPEG decoding costs what it costs on photos.
Models have random weights (speed does not depend on them), exported with utils.deploy.export.write_onnx (what
export.py uses), FashionCNN at 28 px and ResNet18 at 224 px by default.

Examples:
  python benchmarks/bench_predict.py
  python benchmarks/bench_predict.py --configs custom:28 --num_images 500 --batch_size 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from benchmarks.common import OtherLoad, command_line, contention_note, machine_info, table, write_json  # noqa: E402
from models import MODEL_NAMES, build_model, model_kwargs  # noqa: E402
from utils import cli  # noqa: E402
from utils.data.preprocess import Preprocess, list_images, preprocess_file  # noqa: E402
from utils.deploy.predict import DEFAULT_WORKERS, LoopOptions, OutputOptions, iter_decoded, run_prediction  # noqa: E402
from utils.deploy.runtime import OnnxModel  # noqa: E402
from utils.errors import InputError  # noqa: E402

CLASSES = [f"class_{i}" for i in range(10)]
COLUMNS = [("model", "model"), ("img_size", "img px"), ("images", "images"), ("batch_size", "batch"),
           ("workers", "decode threads"), ("loop_img_s", "predict loop img/s"), ("raw_img_s", "raw ORT img/s"),
           ("ratio", "ratio loop / raw"), ("ratio_spinning", "ratio, ORT threads spinning"),
           ("decode_img_s", "decode only img/s")]


def parse_config(text: str) -> tuple[str, int]:
    name, _, size = text.partition(":")
    if name not in MODEL_NAMES or not size.isdigit() or int(size) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give MODEL:IMG_SIZE with MODEL one of {', '.join(MODEL_NAMES)}")
    return name, int(size)


parse_config.invalid_examples = ["resnet18", "resnet18:0", "nomodel:28"]  # checked by tests/test_bad_flags.py


def parse_args(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--configs", nargs="+", type=parse_config, default=[("custom", 28), ("resnet18", 224)],
                   metavar="MODEL:IMG", help="networks and input sizes to measure")
    p.add_argument("--num_images", type=cli.positive(), default=2000, help="JPEGs in the folder")
    p.add_argument("--width", type=cli.positive(), default=500, help="image width in pixels")
    p.add_argument("--height", type=cli.positive(), default=375, help="image height in pixels")
    p.add_argument("--quality", type=cli.positive(), default=90, help="JPEG quality")
    p.add_argument("--folder", default=None,
                   help="where the JPEGs are made (reused when it already holds them); default: a temporary folder")
    p.add_argument("--batch_size", type=cli.positive(), default=64, help="images per forward pass (both measurements)")
    p.add_argument("--num_workers", type=cli.non_negative(), default=DEFAULT_WORKERS, help="decoding threads of the loop")
    p.add_argument("--raw_images", type=cli.positive(), default=512,
                   help="preprocessed images held in memory for the raw ORT measurement (cycled)")
    p.add_argument("--repeats", type=cli.positive(), default=1,
                   help="measurements of each kind, alternating loop and raw (the median is reported)")
    p.add_argument("--out", default="results/benchmarks/bench_predict.json", help="JSON file with every row and the machine")
    return p.parse_args(argv)


def photo(rng: np.random.Generator, base: Image.Image, width: int, height: int) -> Image.Image:
    """A crop of a real photograph blended with rendered shapes on a gradient, plus noise."""
    scale = rng.uniform(0.45, 1.0)
    cw, ch = int(base.width * scale), int(base.width * scale * height / width)
    ch = min(ch, base.height)
    x0, y0 = int(rng.integers(0, base.width - cw + 1)), int(rng.integers(0, base.height - ch + 1))
    crop = base.crop((x0, y0, x0 + cw, y0 + ch)).resize((width, height), Image.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, width)[None, :, None]
    scene = Image.fromarray(np.broadcast_to(c0 * (1 - t) + c1 * t, (height, width, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(scene)
    for _ in range(int(rng.integers(4, 10))):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(width // 25 + 1, width // 2 + 2)), int(rng.integers(height // 25 + 1, height // 2 + 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + w, y + h), fill=fill)
    mixed = np.asarray(Image.blend(crop, scene, float(rng.uniform(0.3, 0.6))), dtype=np.int16)
    mixed = mixed + rng.normal(0, 6, mixed.shape).astype(np.int16)
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def make_folder(folder: Path, n: int, width: int, height: int, quality: int) -> list[Path]:
    """n JPEGs under folder/ (kept when a manifest says the folder already holds exactly these)."""
    from matplotlib import cbook

    manifest = folder / "bench_predict_folder.json"
    spec = {"num_images": n, "width": width, "height": height, "quality": quality, "version": 1}
    if manifest.is_file() and json.loads(manifest.read_text()) == spec:
        return list_images(folder)
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        base = Image.open(f).convert("RGB")
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 500:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        photo(rng, base, width, height).save(sub / f"{i:05d}.jpg", quality=quality)
    manifest.write_text(json.dumps(spec))
    return list_images(folder)


def export(name: str, size: int, workdir: Path) -> tuple[Path, Preprocess]:
    from utils.deploy.export import write_onnx

    pre = Preprocess.for_size(size)
    model = build_model(name, len(CLASSES), **model_kwargs(size)).eval()
    path = workdir / f"{name}_{size}.onnx"
    meta = {"model_name": name, "classes": json.dumps(CLASSES), "preprocess": pre.to_json(),
            "source_checkpoint": "random weights (benchmark)"}
    write_onnx(copy.deepcopy(model), path, pre, meta, opset=17, dynamic_size=False, half=False, exporter="legacy")
    return path, pre


def time_loop(path: Path, paths: list[Path], args, out_csv: Path, spinning: bool) -> float:
    """images/s of run_prediction as predict.py --output calls it, on a warm session. predict.py turns ONNX Runtime's
    thread spinning off when decoding threads run (spinning=False here); spinning=True measures the alternative."""
    model = OnnxModel(path, "cpu", spinning=spinning)
    pre = model.preprocess
    model(np.stack([preprocess_file(paths[0], pre)] * min(args.batch_size, len(paths))))  # warm-up, untimed
    out = OutputOptions(topk=5, output=str(out_csv), exist_ok=True, quiet=True)
    header = {"model": str(path), "engine": "onnxruntime", "precision": "fp32", "device": "cpu", "load_ms": 0.0}
    opts = LoopOptions(args.batch_size, args.num_workers, warmup=0, repeats=1)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_prediction(model, paths, pre, CLASSES, header, out, opts)
    seconds = time.perf_counter() - start
    rows = sum(1 for _ in out_csv.open()) - 1
    if code != 0 or rows != len(paths):
        raise RuntimeError(f"the loop failed (exit {code}, {rows} rows for {len(paths)} images)")
    return len(paths) / seconds


def time_raw(path: Path, batches: list[np.ndarray], total: int) -> float:
    """images/s of session.run alone, default session options, cycling through the preprocessed batches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    session.run(None, {name: batches[0]})  # warm-up, untimed
    done, seconds, i = 0, 0.0, 0
    while done < total:
        batch = batches[i % len(batches)][: total - done]
        start = time.perf_counter()
        session.run(None, {name: batch})
        seconds += time.perf_counter() - start
        done += len(batch)
        i += 1
    return total / seconds


def time_decode(paths: list[Path], pre: Preprocess, args) -> float:
    start = time.perf_counter()
    for _, item in iter_decoded(paths, pre, args.num_workers, ahead=2 * args.batch_size + args.num_workers):
        if isinstance(item, str):
            raise RuntimeError(item)
    return len(paths) / (time.perf_counter() - start)


def bench_config(name: str, size: int, paths: list[Path], args, workdir: Path) -> dict:
    path, pre = export(name, size, workdir)
    held = [preprocess_file(p, pre) for p in paths[: args.raw_images]]
    batches = [np.stack(held[i:i + args.batch_size]) for i in range(0, len(held), args.batch_size)]
    batches = [b for b in batches if len(b) == args.batch_size] or batches
    loops, raws, spins = [], [], []
    rows_csv = workdir / f"{name}_{size}_rows.csv"
    for _ in range(args.repeats):  # alternate, so slow phases of a shared machine hit all three
        loops.append(time_loop(path, paths, args, rows_csv, spinning=args.num_workers == 0))
        raws.append(time_raw(path, batches, len(paths)))
        if args.num_workers > 0:
            spins.append(time_loop(path, paths, args, rows_csv, spinning=True))
    decode = time_decode(paths, pre, args)
    loop, raw = float(np.median(loops)), float(np.median(raws))
    spin = float(np.median(spins)) if spins else None
    return {"model": name, "img_size": size, "images": len(paths), "batch_size": args.batch_size,
            "workers": args.num_workers, "loop_img_s": loop, "raw_img_s": raw, "ratio": round(loop / raw, 3),
            "loop_spinning_img_s": spin, "ratio_spinning": round(spin / raw, 3) if spin else None,
            "decode_img_s": decode, "loop_repeats_img_s": loops, "raw_repeats_img_s": raws,
            "loop_spinning_repeats_img_s": spins}


def lscpu_model() -> str:
    import subprocess

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.width < 8 or args.height < 8:
        raise InputError("--width and --height must be at least 8 pixels")
    import onnxruntime as ort

    meter = OtherLoad()
    machine = machine_info(torch.device("cpu"))
    machine["lscpu_model"] = lscpu_model()
    machine["onnxruntime"] = ort.__version__
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / "photos"
        start = time.perf_counter()
        paths = make_folder(folder, args.num_images, args.width, args.height, args.quality)
        made_s = time.perf_counter() - start
        workdir = Path(tmp) / "work"
        workdir.mkdir()
        for name, size in args.configs:
            rows.append(bench_config(name, size, paths, args, workdir))
    note = contention_note(meter, machine["cores"])
    command = command_line("bench_predict.py", argv)
    print(f"## Folder prediction vs raw ONNX Runtime ({machine['lscpu_model'] or machine['cpu']}, {machine['cores']} "
          f"cores, onnxruntime {machine['onnxruntime']})\n")
    print(table(rows, COLUMNS))
    print(f"\n{len(paths)} JPEGs {args.width}x{args.height} at quality {args.quality} (crops of matplotlib's "
          f"grace_hopper.jpg blended with rendered shapes and noise; folder ready in {made_s:.1f} s). Loop: "
          "predict.py's run_prediction with --output CSV (decode + preprocess + ORT + rows), whole wall time; raw ORT: "
          f"session.run only on batches of the same preprocessed images ({min(args.raw_images, len(paths))} held, "
          f"cycled); median of {args.repeats} alternating measurement(s).")
    if note:
        print(note)
    print(f"command: {command}")
    out = write_json(args.out, {"benchmark": "predict", "command": command, "machine": machine,
                                "other_processes_cores": meter.cores(), "contention": note, "settings": vars(args),
                                "rows": rows})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    cli.run(main)
