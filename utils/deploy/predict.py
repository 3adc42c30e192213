"""The prediction loop every predict script shares, written once: image files through the shared eval transform,
a `forward` function on batches, top-k with probabilities, and the output (text or JSON on stdout, or rows streamed
to a CSV / JSON Lines file). Torch-free: predict.py passes an ONNX Runtime forward, predict_ckpoint.py and
TorchScript a torch one.

Built for folders of tens of thousands of images on a few cores:
- decoding (Pillow releases the GIL while it decodes and resizes) runs in a thread pool a bounded number of images
  ahead of inference, so the next batch is decoded while the model runs on this one;
- results are written as they come (`--output`), never all held in memory: memory stays flat with the folder size;
- one bad file (missing, not an image, truncated, over the pixel limit decoded or once resized:
  utils.data.preprocess.oversize_reason, the limit training applies) or an image whose scores are NaN is reported on
  one line and skipped; the others are predicted and the exit code is 2 at the end.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from utils import cli
from utils.data.preprocess import Preprocess, list_images, preprocess_file
from utils.errors import InputError
from utils.io import atomic_path, display_line, display_path, remove_stale_temps

WARMUP_RUNS = 3
OUTPUT_FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)

Forward = Callable[[np.ndarray], np.ndarray]


def add_predict_args(p) -> None:
    """Flags shared by predict.py and predict_ckpoint.py."""
    p.add_argument("--image", nargs="+", required=True, metavar="IMG",
                   help="image file(s), folder(s) (searched recursively) or quoted glob(s) such as 'imgs/*.jpg'")
    p.add_argument("--topk", type=cli.positive(), default=5, help="how many classes to show per image")
    p.add_argument("--classes", default=None, metavar="FILE|a,b,c",
                   help="class names (classes.txt, one per line, or comma-separated); only needed when the model has none")
    p.add_argument("--batch_size", type=cli.positive(), default=64,
                   help="images per forward pass (a model exported with a fixed batch size of 1 runs one at a time)")
    p.add_argument("--num_workers", type=cli.non_negative(), default=DEFAULT_WORKERS,
                   help="threads decoding images while the model runs (0 = decode in the main thread, no overlap)")
    p.add_argument("--output", default=None, metavar="FILE.csv|FILE.jsonl",
                   help="stream one row per image (path, top-k classes and probabilities, error) to this CSV or JSON "
                        "Lines file instead of printing each image; written under a temporary name and renamed when "
                        "complete. An existing file is never replaced unless --exist_ok is given")
    p.add_argument("--exist_ok", action="store_true", help="allow --output to replace an existing file")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (summary + per-image top-k) instead of text; with --output, the summary only")
    p.add_argument("--repeats", type=cli.positive(), default=1, help="timed runs per batch (the median is reported)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar (it is drawn on stderr only when stderr is a terminal and the per-image "
                        "results are not printed as text there)")
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
    inference_ms: float | None = None  # this image's share of its batch's forward time
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "top": [{"class": c, "index": i, "prob": p} for c, i, p in self.top],
                "inference_ms": self.inference_ms}


@dataclass(frozen=True)
class LoopOptions:
    """How the loop runs: batch size, decoding threads, untimed warm-up runs of the first batch, timed runs per batch."""

    batch_size: int = 64
    workers: int = DEFAULT_WORKERS
    warmup: int = WARMUP_RUNS
    repeats: int = 1


@dataclass(frozen=True)
class OutputOptions:
    """What the loop shows or writes: top-k per image, text or one JSON document on stdout, or rows streamed to
    `output` (.csv / .jsonl; an existing file only replaced with `exist_ok`), with or without a progress bar."""

    topk: int = 5
    json: bool = False
    output: str | None = None
    exist_ok: bool = False
    quiet: bool = False


def decode(path: Path, pre: Preprocess) -> np.ndarray | str:
    """The model input (CHW float32) of one file, or the one-line reason it cannot be read."""
    try:
        return preprocess_file(path, pre)
    except InputError as e:
        return str(e)


def iter_decoded(paths: Sequence[Path], pre: Preprocess, workers: int, ahead: int) -> Iterator[tuple[Path, np.ndarray | str]]:
    """(path, input or error) in input order; with workers > 0 decoded in threads, at most `ahead` images in flight
    (what bounds the memory whatever the number of files)."""
    if workers <= 0:
        for path in paths:
            yield path, decode(path, pre)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        it = iter(paths)
        try:
            for path in it:
                pending.append((path, pool.submit(decode, path, pre)))
                if len(pending) >= ahead:
                    done_path, future = pending.popleft()
                    yield done_path, future.result()
            while pending:
                done_path, future = pending.popleft()
                yield done_path, future.result()
        finally:
            for _, future in pending:  # stopped early (an error, Ctrl-C): do not decode the rest
                future.cancel()


def nan_error(path: Path, logits: np.ndarray) -> str:
    bad = "NaN" if np.isnan(logits).any() else "infinite"
    return (f"model produced NaN probabilities for {path} (its scores are {bad}): the model or its weights are broken "
            "(a diverged training run?); use weights from a checkpoint saved before it went wrong")


def iter_predictions(forward: Forward, paths: Sequence[Path], pre: Preprocess, classes: list[str], k: int,
                     opts: LoopOptions, batch_ms: list[float] | None = None) -> Iterator[Prediction]:
    """One Prediction per path, in input order: bad files and NaN scores as Predictions with `error` set.

    Images are decoded `opts.workers` threads ahead (two batches in flight) and run in batches of `opts.batch_size`;
    the first batch is run `opts.warmup` times untimed; each batch's time is the median of `opts.repeats` runs, and
    its share per image is appended to `batch_ms` when given."""
    entries: list[tuple[Path, np.ndarray | str]] = []
    good = 0
    warmed = opts.warmup <= 0

    def flush() -> Iterator[Prediction]:
        nonlocal warmed
        arrays = [item for _, item in entries if not isinstance(item, str)]
        logits, per_image_ms = None, None
        if arrays:
            batch = np.stack(arrays)
            if not warmed:
                for _ in range(opts.warmup):
                    forward(batch)
                warmed = True
            times = []
            for _ in range(max(1, opts.repeats)):
                start = time.perf_counter()
                logits = forward(batch)
                times.append(time.perf_counter() - start)
            logits = np.asarray(logits, dtype=np.float64)
            per_image_ms = float(np.median(times)) * 1000.0 / len(arrays)
            if batch_ms is not None:
                batch_ms.append(per_image_ms)
        row = 0
        for path, item in entries:
            if isinstance(item, str):
                yield Prediction(str(path), error=item)
                continue
            scores = logits[row]
            row += 1
            probs = softmax(scores)
            if not np.isfinite(probs).all():
                yield Prediction(str(path), error=nan_error(path, scores))
                continue
            yield Prediction(str(path), [(classes[i], i, p) for i, p in topk(probs, k)], per_image_ms)
        entries.clear()

    for path, item in iter_decoded(paths, pre, opts.workers, ahead=2 * opts.batch_size + opts.workers):
        entries.append((path, item))
        good += not isinstance(item, str)
        if good == opts.batch_size:
            yield from flush()
            good = 0
    if entries:
        yield from flush()


class RowWriter:
    """Streams predictions to an open CSV or JSON Lines file: one row per image, input order.

    CSV columns: path, top1_class, top1_prob, ..., top<k>_class, top<k>_prob, error (empty for good images; for a bad
    one the class and probability cells are empty). JSON Lines: {"path", "top": [{"class", "index", "prob"}], "error"}."""

    def __init__(self, f, fmt: str, k: int):
        self.fmt, self.f, self.k = fmt, f, k
        if fmt == "csv":
            self.csv = csv.writer(f)
            self.csv.writerow(["path", *(f"top{r}_{c}" for r in range(1, k + 1) for c in ("class", "prob")), "error"])

    def write(self, p: Prediction) -> None:
        if self.fmt == "csv":
            cells = [cell for name, _, prob in p.top for cell in (name, repr(prob))]
            self.csv.writerow([p.image, *cells, *[""] * (2 * self.k - len(cells)), p.error or ""])
        else:
            top = [{"class": c, "index": i, "prob": prob} for c, i, prob in p.top]
            self.f.write(json.dumps({"path": p.image, "top": top, "error": p.error}) + "\n")


def check_output(output: str | None, exist_ok: bool) -> tuple[Path, str] | None:
    """--output: a .csv or .jsonl path that does not exist yet (or --exist_ok); checked before any work."""
    if output is None:
        return None
    path = Path(output)
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"--output {output}: unknown format {path.suffix or '(no suffix)'}; use a .csv or .jsonl file name")
    if path.is_dir():
        raise InputError(f"--output {output} is a directory: give a file name ending in .csv or .jsonl")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise InputError(f"--output {output}: {blocker} is a file, not a folder; choose another place for the output")
    if path.exists() and not exist_ok:
        raise InputError(f"--output {output} already exists: choose another name or pass --exist_ok to replace it")
    return path, fmt


def show_progress(quiet: bool, text_to_stdout: bool) -> bool:
    """A bar on a terminal's stderr, unless asked to be quiet or the per-image text goes to the same terminal."""
    return not quiet and sys.stderr.isatty() and not (text_to_stdout and sys.stdout.isatty())


def print_text(p: Prediction, k: int) -> None:
    print(f"\n{display_path(p.image)}\nTop {min(k, len(p.top))} predictions:")
    names = [display_line(c) for c, _, _ in p.top]
    width = max(len(c) for c in names)
    for rank, (name, (_, _, prob)) in enumerate(zip(names, p.top), 1):
        print(f"  {rank}. {name:<{width}}  {100 * prob:6.2f}%")
    print(f"  inference {p.inference_ms:.2f} ms")


def run_prediction(forward: Forward, paths: Sequence[Path], pre: Preprocess, classes: list[str], header: dict,
                   out: OutputOptions, opts: LoopOptions) -> int:
    """The predict scripts' main loop and output. Bad files go to stderr as they are met; the exit code is 2 if any
    image failed, else 0."""
    target = check_output(out.output, out.exist_ok)
    k = min(out.topk, len(classes))
    text_mode = not out.json and target is None
    collect = out.json and target is None  # JSON on stdout without --output holds every prediction
    collected: list[dict] = []
    batch_ms: list[float] = []
    total = failed = 0
    if text_mode:
        print(f"model: {display_path(header['model'])} ({header['engine']}, {header['precision']}, {header['device']})  "
              f"loaded in {header['load_ms']:.1f} ms")
    from utils.progress import bar as progress_bar  # tqdm: imported here so the module itself stays light

    bar = progress_bar(total=len(paths), unit="img", desc="predict", enabled=show_progress(out.quiet, text_mode))

    def consume(sink: RowWriter | None) -> None:
        nonlocal total, failed
        for p in iter_predictions(forward, paths, pre, classes, k, opts, batch_ms):
            total += 1
            bar.update(1)
            if p.error:
                failed += 1
                bar.write(f"error: {display_line(p.error)}", file=sys.stderr)
            if sink is not None:
                sink.write(p)
            elif collect:
                collected.append(p.to_dict())
            elif text_mode and not p.error:
                print_text(p, k)

    try:
        with warnings.catch_warnings():  # set in the main thread, so it holds for the decoding threads too
            # Pillow warns on opening an image over its pixel limit; load_image refuses it with its own error line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if target is None:
                consume(None)
            else:
                for stale in remove_stale_temps(target[0].parent):  # a killed run's partial output never piles up
                    print(f"removed {display_path(stale)} (the partial output of a killed run)", file=sys.stderr)
                try:
                    with atomic_path(target[0]) as tmp, open(tmp, "w", newline="", encoding="utf-8",
                                                             errors="surrogateescape") as f:
                        consume(RowWriter(f, target[1], k))
                except OSError as e:
                    raise InputError(f"cannot write --output {target[0]}: {e.strerror or e}") from None
    finally:
        bar.close()
    median_ms = float(np.median(batch_ms)) if batch_ms else None
    summary = dict(header, num_images=total, num_failed=failed, median_inference_ms=median_ms,
                   batch_size=opts.batch_size)
    if target is not None:
        summary["output"] = str(target[0])
    if out.json:
        print(json.dumps({"summary": summary} if target else {"summary": summary, "predictions": collected}, indent=2))
    else:
        if target is not None:
            print(f"model: {display_path(header['model'])} ({header['engine']}, {header['precision']}, {header['device']})  "
                  f"loaded in {header['load_ms']:.1f} ms")
            print(f"wrote {total} row(s) to {display_path(target[0])} ({target[1]}"
                  + (f"; {failed} failed, their reason in the error column" if failed else "") + ")")
        if median_ms is not None:
            print(f"\n{total - failed} image(s): median inference {median_ms:.2f} ms per image (batch {opts.batch_size}, "
                  f"after {opts.warmup} warm-up runs), model load {header['load_ms']:.1f} ms")
    if failed:
        print(f"{failed} of {total} image(s) could not be predicted (see the error lines above)", file=sys.stderr)
        return 2
    return 0


def expand_images(specs: Sequence[str]) -> list[Path]:
    """--image values (files, folders, globs) -> image paths; an empty expansion is an input error."""

    paths = list_images(list(specs))
    if not paths:
        raise InputError(f"--image {' '.join(specs)}: no images found (give files, a folder or a quoted glob like 'imgs/*.png')")
    return paths
