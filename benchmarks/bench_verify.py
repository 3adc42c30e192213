"""How long checking an image folder before training takes: the three ways utils.data.folders could check a JPEG.

- verify+EOI: Image.verify() (parses headers only) plus the end-of-image marker check (the toolkit's earlier check;
  misses corrupt data in the middle of a file);
- draft decode (the default, utils.data.folders.check_image): a full decode, JPEGs at 1/8 scale (libjpeg's DCT
  scaling reads every byte of the data, so truncated or corrupt data is still found);
- full decode: check_image(full=True), every pixel at full size.

Each in threads (Pillow releases the GIL while decoding) over a folder of photo-sized JPEGs made here: 500x375,
quality 90, with image structure (smooth gradients, shapes, texture), written by PIL.

  python benchmarks/bench_verify.py --images 2000
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter  # noqa: E402

from benchmarks.common import ROOT, OtherLoad, command_line, contention_note, machine_info, table, write_json  # noqa: E402
from utils import cli  # noqa: E402
from utils.data.folders import check_images  # noqa: E402

COLUMNS = [("method", "method"), ("images", "images"), ("threads", "threads"), ("seconds", "s"),
           ("images_per_s", "images/s"), ("ratio", "x verify+EOI")]


def make_photos(folder: Path, n: int, seed: int = 0) -> list[str]:
    """n 500x375 JPEGs at quality 90: a two-colour gradient, a few blurred ellipses and rectangles, fine noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    paths = []
    for i in range(n):
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        t = ((xx * np.cos(i) + yy * np.sin(i)) / 625.0 + 0.5).clip(0, 1)[..., None]
        base = (a * (1 - t) + b * t).astype(np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x0, y0 = rng.integers(0, 450), rng.integers(0, 330)
            box = (x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 150))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        img = img.filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3))
        path = folder / f"photo_{i:05d}.jpg"
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(str(path))
    return paths


def verify_and_eoi(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()
        if fmt == "JPEG":
            with open(path, "rb") as f:
                f.seek(-2, os.SEEK_END)
                if f.read(2) != b"\xff\xd9":
                    return "no EOI"
    except Exception as e:
        return str(e)
    return None


def main(argv=None) -> int:
    p = cli.parser(__doc__)
    p.add_argument("--images", type=cli.positive(), default=2000, help="JPEGs to make and check")
    p.add_argument("--threads", type=cli.positive(), default=os.cpu_count(), help="checking threads")
    p.add_argument("--out", default=str(ROOT / "results" / "benchmarks" / "verify.json"))
    args = p.parse_args(argv)
    meter = OtherLoad()
    machine = machine_info(torch.device("cpu"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_verify_") as tmp:
        paths = make_photos(Path(tmp), args.images)
        for method in ("verify+EOI", "draft decode", "full decode"):
            start = time.perf_counter()
            if method == "verify+EOI":
                with ThreadPoolExecutor(args.threads) as pool:
                    results = list(pool.map(verify_and_eoi, paths))
            else:
                results = check_images(paths, show_progress=False, workers=args.threads, full=method == "full decode")
            seconds = time.perf_counter() - start
            assert not any(results), [r for r in results if r][:3]
            rows.append({"method": method, "images": len(paths), "threads": args.threads, "seconds": seconds,
                         "images_per_s": len(paths) / seconds})
    for r in rows:
        r["ratio"] = rows[0]["seconds"] / r["seconds"]
    print(f"## Checking {args.images} JPEGs of 500x375 before training ({machine['cpu']}, {machine['cores']} cores)\n")
    print(table(rows, COLUMNS))
    note = contention_note(meter, machine["cores"])
    if note:
        print(note)
    command = command_line("bench_verify.py", argv)
    print(f"command: {command}")
    out = write_json(args.out, {"benchmark": "verify", "command": command, "machine": machine, "contention": note, "rows": rows})
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
