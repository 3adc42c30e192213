"""Fashion-MNIST's files: found locally, copied from Debian's dataset-fashion-mnist package or downloaded
(`ensure_fashion_mnist`), checked before torchvision reads them (`verify_fashion_files`), opened as a dataset
(`fashion_mnist`), and test images written out as PNG files (`save_test_images`)."""

from __future__ import annotations

import gzip
import math
import shutil
import zlib
from pathlib import Path

from torchvision import datasets

from utils.errors import InputError
from utils.io import atomic_path

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_SIZE = 28  # every image is 28 x 28 px, grayscale
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


def _raw_present(raw: Path) -> bool:
    return all((raw / f).is_file() or (raw / f"{f}.gz").is_file() for f in FASHION_MNIST_FILES)


def ensure_fashion_mnist(data_root: str | Path) -> Path:
    """Make the four Fashion-MNIST files available under `<data_root>/FashionMNIST/raw/`.

    Order: files already there; Debian's dataset-fashion-mnist package; torchvision's download.
    """
    root = Path(data_root)
    raw = root / "FashionMNIST" / "raw"
    if _raw_present(raw):
        return root
    if DEBIAN_FASHION_MNIST.is_dir():
        raw.mkdir(parents=True, exist_ok=True)
        for name in FASHION_MNIST_FILES:
            src = next((p for p in (DEBIAN_FASHION_MNIST / f"{name}.gz", DEBIAN_FASHION_MNIST / name) if p.is_file()), None)
            if src is None:
                break
            with atomic_path(raw / name) as tmp:
                if src.suffix == ".gz":  # Debian rewrote the gzip headers, so decompress instead of copying
                    with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                else:
                    shutil.copyfile(src, tmp)
        if _raw_present(raw):
            return root
    try:
        datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as e:  # torchvision raises RuntimeError/URLError when offline
        raise InputError(
            f"Fashion-MNIST not found and could not be downloaded ({type(e).__name__}): put the four files "
            f"{', '.join(f + '.gz' for f in FASHION_MNIST_FILES)} in {raw}/ "
            "or run 'apt-get install dataset-fashion-mnist'"
        ) from None
    return root


def _idx_problem(data: bytes, header_only: bool = False, size: int = 0) -> str | None:
    """What is wrong with an IDX file (Fashion-MNIST's format: magic, dimensions, then uint8 values), or None."""
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 8 or not 1 <= data[3] <= 3:
        return "not an IDX file of uint8 values"
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        return "its header is cut off"
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + math.prod(dims)
    actual = size if header_only else len(data)
    if actual != expected:
        return f"{actual} bytes of data where its header ({' x '.join(map(str, dims))}) needs {expected}"
    return None


def verify_fashion_files(raw: Path) -> None:
    """Check the four files before torchvision reads them: a truncated or corrupt file (or .gz archive) is one line
    naming it, instead of torchvision's attempt to download a replacement. Extracted files: header and size only;
    archives that torchvision still has to extract: decompressed in full (once; later runs find the extracted file)."""
    for name in FASHION_MNIST_FILES:
        plain, packed = raw / name, raw / f"{name}.gz"
        try:
            if plain.is_file():
                with open(plain, "rb") as f:
                    problem = _idx_problem(f.read(16), header_only=True, size=plain.stat().st_size)
                path = plain
            elif packed.is_file():
                path = packed
                with gzip.open(packed, "rb") as f:
                    problem = _idx_problem(f.read())
            else:
                continue
        except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; a cut archive an EOFError
            problem = f"{type(e).__name__}: {e}"
        if problem:
            raise InputError(f"Fashion-MNIST file {path} is truncated or corrupt ({problem}); fix: delete it and put "
                             f"the original {path.name} there (or delete it and let the run download it)")


def fashion_mnist(data_root: str | Path, train: bool, transform=None) -> datasets.FashionMNIST:
    root = ensure_fashion_mnist(data_root)
    verify_fashion_files(Path(root) / "FashionMNIST" / "raw")
    try:
        return datasets.FashionMNIST(str(root), train=train, download=True, transform=transform)
    except RuntimeError as e:
        reason = " ".join(str(e).split())
        raise InputError(f"Fashion-MNIST files in {root}/FashionMNIST/raw are unusable: {reason}") from None


def save_test_images(data_root: str | Path, out_dir: str | Path, count: int = 10, start: int = 0) -> list[Path]:
    """Write Fashion-MNIST test images `start`..`start+count-1` as 28x28 grayscale PNGs named <index>_<class>.png.

    Gives predict.py real inputs with known labels (the label is in the file name); save_test_images.py is its CLI.
    """
    ds = fashion_mnist(data_root, train=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(start, min(start + count, len(ds))):
        img, label = ds[i]
        name = FASHION_MNIST_CLASSES[label].replace("/", "_").replace(" ", "_")
        path = out / f"{i:05d}_{name}.png"
        with atomic_path(path) as tmp:
            img.save(tmp)
        written.append(path)
    return written
