"""Which files are images and which folders are never data, for every module that lists files: the image extensions
Pillow can decode here, hidden and OS junk names, the decode-once cache's folders, and a file's identity (st_dev,
st_ino: hard links are one file).

Its own module, below both utils.data.folders (the scanning rules) and utils.data.preprocess (decoding and
`list_images`), so that the folder checks can use the decoder's limits without an import cycle. Torch-free.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections.abc import Collection
from pathlib import Path

from PIL import Image, ImageFile

from utils.errors import InputError

JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "__macosx", "$recycle.bin", "system volume information"})
# Pillow identifies these but cannot decode their pixels (video, or formats that need an external handler)
UNDECODABLE_FORMATS = frozenset({"MPEG"})
# the files of utils.data.cache (<kind>-<side>px[-gray]-<folder tag>-<key>.npy/.json) and their temporary names
CACHE_FILE = re.compile(r"^\.?(train|val)-\d+px(-gray)?-[0-9a-f]{8}-[0-9a-f]{32}(\.tmp-\d+)?\.(npy|json)$")


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format this Pillow can open and decode. Derived from
    Image.registered_extensions(), not a fixed list: stub formats (HDF5, GRIB, BUFR, WMF), MPEG video, and EPS without
    Ghostscript are left out because Pillow cannot decode them."""
    from PIL import EpsImagePlugin

    Image.init()
    out = set()
    for ext, fmt in Image.registered_extensions().items():
        if fmt not in Image.OPEN or fmt in UNDECODABLE_FORMATS:
            continue
        factory = Image.OPEN[fmt][0]
        if inspect.isclass(factory) and issubclass(factory, ImageFile.StubImageFile):
            continue
        if fmt == "EPS" and not EpsImagePlugin.has_ghostscript():
            continue
        out.add(ext.lower())
    return frozenset(out)


def is_ignored_name(name: str) -> bool:
    """Hidden files and folders (".DS_Store", "._x.jpg", ".ipynb_checkpoints") and OS junk (Thumbs.db, __MACOSX)."""
    return name.startswith(".") or name.lower() in JUNK_NAMES


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions()


def is_cache_dir(folder: str | Path, configured: Collection[str] = ()) -> bool:
    """Whether `folder` is a decode-once cache folder: one of the `configured` ones (real paths: this run's
    --cache_dir, even while still empty) or one holding a cache file (CACHE_FILE; another run's). Such a folder is
    never a class folder nor part of one, wherever --cache_dir put it."""
    if configured and os.path.realpath(folder) in configured:
        return True
    try:
        with os.scandir(folder) as entries:
            return any(CACHE_FILE.match(e.name) for e in entries)
    except OSError:
        return False


def file_key(path: str, entry: os.DirEntry | None = None) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file `path` names (links followed): equal for every hard link of one file. None when
    the file system has no inode numbers (0) or the file cannot be read (its check names it)."""
    try:
        st = entry.stat(follow_symlinks=True) if entry is not None else os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st.st_ino else None


def check_cache_folder(root: Path, cache: str) -> None:
    """The run's --cache_dir inside the dataset must be a folder of its own: one holding images (a class folder) would
    silently drop that class from the scan."""
    real_root = os.path.realpath(root)
    if cache != real_root and not cache.startswith(real_root + os.sep):
        return
    try:
        names = sorted(os.listdir(cache))
    except OSError:
        return
    image = next((n for n in names if has_image_extension(n) and not is_ignored_name(n)), None)
    if image is not None:
        raise InputError(f"--cache_dir {cache} holds images ({image}), so it is part of the dataset {root}: give the cache "
                         "a folder of its own (e.g. <dataset>/.cache, or the default data/.cache)")
