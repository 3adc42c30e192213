"""The prediction loop every predict script shares: image files through the shared eval transform, a forward
function, top-k with probabilities, and the report (text or JSON; bad files on stderr, exit code 2). Torch-free:
predict.py passes an ONNX Runtime forward, predict_ckpoint.py and TorchScript a torch one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import cli
from utils.data.preprocess import Preprocess, list_images, preprocess_file
from utils.errors import InputError

WARMUP_RUNS = 3


def add_predict_args(p) -> None:
    """Flags shared by predict.py and predict_ckpoint.py."""
    p.add_argument("--image", nargs="+", required=True, metavar="IMG",
                   help="image file(s), folder(s) (searched recursively) or quoted glob(s) such as 'imgs/*.jpg'")
    p.add_argument("--topk", type=cli.positive(), default=5, help="how many classes to show per image")
    p.add_argument("--classes", default=None, metavar="FILE|a,b,c",
                   help="class names (classes.txt, one per line, or comma-separated); only needed when the model has none")
    p.add_argument("--json", action="store_true", help="print one JSON document (summary + per-image top-k) instead of text")
    p.add_argument("--repeats", type=cli.positive(), default=1, help="timed runs per image (the median is reported)")
    cli.add_device_arg(p)


def load_class_names(spec: str | None) -> list[str] | None:
    """--classes: a text file with one name per line, or a comma-separated list."""
    if not spec:
        return None
    p = Path(spec)
    if p.is_file():
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    elif "," in spec:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        raise InputError(f"--classes {spec}: not a file; give classes.txt (one name per line) or 'name1,name2,...'")
    if not names:
        raise InputError(f"--classes {spec} holds no class names")
    return names


def resolve_classes(meta_classes: list[str] | None, override: list[str] | None, num_outputs: int | None) -> list[str]:
    """Class names: --classes wins, else the artifact's; without either, 'class_<i>' with a note on stderr."""
    classes = override or meta_classes
    if classes is None:
        if num_outputs is None:
            raise InputError("the model has no class names: pass --classes classes.txt")
        print(f"note: the model stores no class names; showing class_0..class_{num_outputs - 1} (pass --classes)",
              file=sys.stderr)
        return [f"class_{i}" for i in range(num_outputs)]
    if num_outputs is not None and len(classes) != num_outputs:
        raise InputError(f"{len(classes)} class names given but the model has {num_outputs} outputs: fix --classes")
    return list(classes)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def topk(probs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Indices and probabilities of the k largest entries of a 1-D array, largest first (ties: lower index)."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, int, float]] = field(default_factory=list)  # (class, index, probability)
    inference_ms: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "top": [{"class": c, "index": i, "prob": p} for c, i, p in self.top],
                "inference_ms": self.inference_ms}


def predict_files(forward: Callable[[np.ndarray], np.ndarray], paths: Sequence[Path], pre: Preprocess,
                  classes: list[str], k: int = 5, warmup: int = 3, repeats: int = 1) -> list[Prediction]:
    """Preprocess each image with the shared eval transform, run `forward`, keep the top k.

    Bad files (missing, not an image, truncated) become Predictions with `error` set; the rest go on.
    The first good image is run `warmup` times untimed; each image's time is the median of `repeats` runs.
    """
    results: list[Prediction] = []
    warmed = False
    for path in paths:
        try:
            x = preprocess_file(path, pre)[None]
        except InputError as e:
            results.append(Prediction(str(path), error=str(e)))
            continue
        if not warmed:
            for _ in range(warmup):
                forward(x)
            warmed = True
        times, logits = [], None
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            logits = forward(x)
            times.append(time.perf_counter() - start)
        probs = softmax(np.asarray(logits, dtype=np.float64)[0])
        top = [(classes[i], i, p) for i, p in topk(probs, k)]
        results.append(Prediction(str(path), top, float(np.median(times)) * 1000.0))
    return results


def report(results: list[Prediction], header: dict, as_json: bool, k: int) -> int:
    """Print the predictions (text or JSON on stdout, bad files on stderr); exit code 2 if any image failed."""
    failed = [r for r in results if r.error]
    good = [r for r in results if not r.error]
    times = [r.inference_ms for r in good]
    summary = dict(header, num_images=len(results), num_failed=len(failed),
                   median_inference_ms=float(np.median(times)) if times else None)
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    if as_json:
        print(json.dumps({"summary": summary, "predictions": [r.to_dict() for r in results]}, indent=2))
    else:
        print(f"model: {header['model']} ({header['engine']}, {header['precision']}, {header['device']})  "
              f"loaded in {header['load_ms']:.1f} ms")
        for r in good:
            print(f"\n{r.image}\nTop {min(k, len(r.top))} predictions:")
            width = max(len(c) for c, _, _ in r.top)
            for rank, (name, _, p) in enumerate(r.top, 1):
                print(f"  {rank}. {name:<{width}}  {100 * p:6.2f}%")
            print(f"  inference {r.inference_ms:.2f} ms")
        if times:
            print(f"\n{len(good)} image(s): median inference {summary['median_inference_ms']:.2f} ms per image "
                  f"(batch 1, after {header['warmup']} warm-up runs), model load {header['load_ms']:.1f} ms")
    if failed:
        print(f"{len(failed)} of {len(results)} image(s) could not be read (see the error lines above)", file=sys.stderr)
        return 2
    return 0


def expand_images(specs: Sequence[str]) -> list[Path]:
    """--image values (files, folders, globs) -> image paths; an empty expansion is an input error."""

    paths = list_images(list(specs))
    if not paths:
        raise InputError(f"--image {' '.join(specs)}: no images found (give files, a folder or a quoted glob like 'imgs/*.png')")
    return paths
