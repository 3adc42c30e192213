"""The scanning rules of image folders, in one place: which files a class folder holds, and which of them Pillow reads.

A dataset split (train/, val/, or a folder to be split) holds one sub-folder per class. Its images are exactly:

- every file under the class folder (sub-folders included) whose extension is one Pillow can open here
  (`image_extensions()`: derived from Pillow's registered formats, so .gif, .jfif, .jpe, .tif, .webp, .avif, ...
  count too; formats Pillow only identifies without decoding are left out);
- minus hidden files and folders (any name starting with ".", e.g. `.DS_Store`, `._photo.jpg`, `.ipynb_checkpoints/`)
  and OS junk (`Thumbs.db`, `desktop.ini`, `__MACOSX/`), which are ignored;
- symbolic links (to files or folders) are followed only when their target lies inside the same class folder, and a
  file reached twice (a link to a file already listed, a link to a folder already listed, a link loop) counts once,
  under its real path when it has one. A link whose target lies outside its class folder (another class, another
  split, elsewhere) is ignored and listed: a link can never make an image count twice or under another class. A
  class folder may itself be a link (its target is then the class folder); two class folders that are the same
  folder, or one inside the other, are an error;
- hard links are the same file too (same st_dev and st_ino): one inside a class counts once, one into another class
  or split is an error (`check_disjoint` for splits), as `cp -al`, rsync --link-dest and dedup tools make them;
- a folder of the decode-once cache (the run's --cache_dir, or one holding cache files: formats.is_cache_dir) is never
  a class nor part of one, so --cache_dir may lie inside the dataset.

Every listed image is then checked (`check_image`: opened and decoded as training will read it, in threads with a
progress bar); the files Pillow cannot read for any reason (not an image, truncated, empty, over the pixel limit of
utils.data.preprocess.oversize_reason once decoded or resized, pixel values without a grey level, a broken link) go
into one report (`report_bad_images`) before anything trains: an error
(exit 2) unless the caller skips them (--skip_bad_images).

Structural problems are one-line errors: no class folder, one class only, a class without a usable image, two class
names that differ only by case, and splits whose classes differ (`check_same_classes`).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections import Counter
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from utils.data.formats import check_cache_folder, file_key, has_image_extension, image_extensions, is_cache_dir, is_ignored_name
from utils.data.preprocess import oversize_reason, pixel_problem
from utils.errors import InputError
from utils.io import display_line, display_path
from utils.progress import bar

PROGRESS_FROM = 500  # show the verification progress bar from this many files on
TABLE_CLASSES = 30  # the per-class table before training lists at most this many classes


@dataclass(frozen=True)
class BadImage:
    """A listed image file that Pillow cannot read, and why."""

    path: str
    reason: str


@dataclass
class FolderScan:
    """One split folder as the rules above list it. `samples` are (path, class index) sorted by class then path, like
    torchvision's ImageFolder; `bad` are the listed files Pillow cannot read (not in `samples`); `ignored` are
    (path, why) of the files the rules leave out (hidden/junk, other extensions, links leaving the class folder,
    repeats)."""

    root: Path
    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    bad: list[BadImage] = field(default_factory=list)
    bad_targets: list[int] = field(default_factory=list)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.classes)}

    def counts(self) -> tuple[list[int], list[int]]:
        """(used, unreadable) image counts per class."""
        used, bad = Counter(t for _, t in self.samples), Counter(self.bad_targets)
        return [used[i] for i in range(len(self.classes))], [bad[i] for i in range(len(self.classes))]

    def describe(self, name: str, skipped: bool) -> str:
        """The per-class table printed before training: used and skipped (unreadable) images, and what was ignored."""
        used, bad = self.counts()
        names = [display_line(c) for c in self.classes]
        lines = [f"{name}: {display_path(self.root)} - {len(self.samples)} images in {len(self.classes)} classes"
                 + (f", {len(self.bad)} unreadable skipped" if skipped and self.bad else "")]
        rows = list(range(len(names)))
        if len(rows) > TABLE_CLASSES:  # hundreds of classes: the ones to look at, not a screenful per split
            rows = sorted(rows, key=lambda i: (-bad[i], used[i], i))[:TABLE_CLASSES]
        width = max(len("class"), *(len(names[i]) for i in rows))
        lines.append(f"  {'class':<{width}}  {'used':>6}  {'skipped':>7}")
        lines += [f"  {names[i]:<{width}}  {used[i]:>6}  {bad[i]:>7}" for i in rows]
        if len(rows) < len(names):
            lines.append(f"  ({len(names) - len(rows)} more classes with {min(used)}-{max(used)} images each; the "
                         f"{len(rows)} with skipped files or the fewest images shown)")
        if self.ignored:
            why = Counter(reason for _, reason in self.ignored)
            lines.append(f"  ignored {len(self.ignored)} files: " + ", ".join(f"{r} ({n})" for r, n in why.most_common()))
            links = [p for p, r in self.ignored if r.startswith("links")]
            if links:
                lines.append("  ignored links: " + ", ".join(map(display_path, links[:5]))
                             + (f" (+{len(links) - 5} more)" if len(links) > 5 else ""))
        return "\n".join(lines)


# ----------------------------------------------------------------------------- listing


def list_classes(root: Path, caches: Collection[str] = ()) -> list[str]:
    """The class folder names under `root`, sorted; errors for none, one, case-only differences and shared folders.
    Cache folders (formats.is_cache_dir; `caches`: real paths of the configured --cache_dir) are not classes."""
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise InputError(f"cannot list {root}: {e.strerror or e}") from None
    classes = [e.name for e in entries if not is_ignored_name(e.name) and e.is_dir() and not is_cache_dir(e.path, caches)]
    if not classes:
        raise InputError(f"no class folders in {root}: expected {root}/<class_name>/<image files>")
    folded: dict[str, str] = {}
    for c in classes:
        other = folded.setdefault(c.casefold(), c)
        if other != c:
            raise InputError(f"class folders {root / other} and {root / c} differ only by case (they would be one folder on "
                             "macOS and Windows): rename or merge one of them")
    if len(classes) == 1:
        raise InputError(f"{root} has one class folder only ({classes[0]}): a classifier needs at least two classes; "
                         "fix: add a folder per class")
    real = {c: os.path.realpath(root / c) for c in classes}
    ordered = sorted(classes, key=lambda c: real[c])
    for a, b in zip(ordered, ordered[1:]):
        if real[b] == real[a] or real[b].startswith(real[a] + os.sep):
            raise InputError(f"class folders {root / a} and {root / b} are the same folder or one holds the other (through a "
                             "symbolic link): each image must belong to one class")
    return classes


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder + os.sep)


def list_class_files(class_dir: Path, seen: dict[tuple[int, int], tuple[str, Path]] | None = None,
                     caches: Collection[str] = ()) -> tuple[list[str], list[BadImage], list[tuple[str, str]]]:
    """(image paths, broken links, ignored (path, why)) of one class folder, by the rules in the module docstring.

    `seen` maps the (st_dev, st_ino) of every file listed so far in this split to (its path, its class folder): a hard
    link (`cp -al`, rsync --link-dest, dedup tools) of a file of this class counts once, like a symbolic link; one of a
    file of another class is an error (the same image under two labels)."""
    top = os.path.realpath(class_dir)
    seen = {} if seen is None else seen
    files: dict[str, str] = {}  # real path -> listed path
    bad: list[BadImage] = []
    ignored: list[tuple[str, str]] = []
    visited = {top}
    links: list[str] = []

    def add(real: str, listed: str, key: tuple[int, int] | None, why: str) -> None:
        first = seen.get(key) if key is not None else None
        if real in files or (first is not None and first[1] == class_dir):
            ignored.append((listed, why))
        elif first is not None:
            raise InputError(f"{listed} and {first[0]} are the same file (hard links): one image cannot belong to two "
                             f"classes ({first[1].name} and {class_dir.name}); fix: keep it in one class folder only")
        else:
            files[real] = listed
            if key is not None:
                seen[key] = (listed, class_dir)

    def walk(folder: str) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            raise InputError(f"cannot list {folder}: {e.strerror or e}") from None
        for e in entries:
            if is_ignored_name(e.name):
                ignored.append((e.path, "hidden or system files"))
            elif e.is_symlink():
                links.append(e.path)
            elif e.is_dir(follow_symlinks=False):
                if is_cache_dir(e.path, caches):
                    ignored.append((e.path, "cache folders"))
                    continue
                visited.add(os.path.realpath(e.path))
                walk(e.path)
            elif not has_image_extension(e.name):
                ignored.append((e.path, "files without an image extension"))
            else:
                add(os.path.realpath(e.path), e.path, file_key(e.path, e), "hard links repeating a file already listed")

    walk(str(class_dir))  # real files and folders first, so a file reached both ways is listed under its real path
    while links:
        link = links.pop(0)
        target = os.path.realpath(link)
        if not os.path.exists(target):
            if has_image_extension(link):
                bad.append(BadImage(link, "broken symbolic link (its target does not exist or the links loop)"))
            else:
                ignored.append((link, "broken links"))
        elif not _inside(target, top):
            ignored.append((link, "links leaving their class folder"))
        elif os.path.isdir(target):
            if target in visited:
                ignored.append((link, "links repeating a folder already listed"))
            else:
                visited.add(target)
                walk(link)
        elif not has_image_extension(link):
            ignored.append((link, "files without an image extension"))
        else:
            add(target, link, file_key(target), "links repeating a file already listed")
    return sorted(files.values()), bad, ignored


# ----------------------------------------------------------------------------- checking


def _jpeg_eoi_missing(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read(2) != b"\xff\xd9"


def check_image(path: str | Path, full: bool = False, resize: int | None = None) -> str | None:
    """None when Pillow reads the file as training will (open, EXIF orientation, pixels decoded); else why not.

    Fast path (default), chosen by benchmarks/bench_verify.py: the file is fully decoded, but a JPEG at 1/8 scale
    (libjpeg's DCT scaling, Image.draft), which still reads every byte of its data; `full` decodes at full size.
    Images over the pixel limit of utils.data.preprocess.oversize_reason (decoded, or once resized to `resize` on the
    shorter side: the same limit predict applies) are refused from the header, before decoding, so training never
    meets one; so are 32-bit/float images whose values have no grey level (preprocess.pixel_problem).
    """
    path = str(path)
    try:
        if os.path.getsize(path) == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as img:
            w, h = img.size
            reason = oversize_reason(w, h, resize)
            if reason:
                return reason
            if img.format == "JPEG" and not full:
                img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
            img.load()
            ImageOps.exif_transpose(img)
            if img.format == "JPEG" and not full and _jpeg_eoi_missing(path):
                # a JPEG cut short at a marker boundary can decode at 1/8 scale: decode it fully to be sure
                with Image.open(path) as again:
                    again.load()
            return pixel_problem(img)
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except Image.DecompressionBombError as e:
        return f"refused by Pillow's decompression-bomb check: {str(e).rstrip('.')}"
    except Exception as e:  # anything Pillow raises for a file is a reason to list it, not a traceback
        text = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_images(paths: Sequence[str], *, show_progress: bool = True, desc: str = "checking images",
                 workers: int | None = None, full: bool = False, resize: int | None = None) -> list[str | None]:
    """check_image over many files in threads (Pillow releases the GIL while decoding), with a progress bar."""
    workers = workers or min(8, os.cpu_count() or 1)
    with warnings.catch_warnings():  # over-limit images are reported by check_image, not warned about per file
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(functools.partial(check_image, full=full, resize=resize), paths)
            return list(bar(results, total=len(paths), desc=desc, leave=False,
                            enabled=show_progress and len(paths) >= PROGRESS_FROM))


def scan_folder(root: str | Path, *, verify: bool = True, show_progress: bool = True, resize: int | None = None,
                cache_dir: str | Path | None = None) -> FolderScan:
    """List (and check) one split folder; raises InputError for the structural problems in the module docstring.
    `resize`: the shorter side the pipeline will resize the images to (check_image refuses what that would blow up);
    `cache_dir`: the run's --cache_dir, never scanned even before it holds a cache file."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"folder not found: {root}")
    caches = {os.path.realpath(cache_dir)} if cache_dir else set()
    for cache in caches:
        check_cache_folder(root, cache)
    classes = list_classes(root, caches)
    scan = FolderScan(root, classes)
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if not entry.is_dir() and not is_ignored_name(entry.name):
            scan.ignored.append((entry.path, "files outside the class folders"))
        elif entry.is_dir() and not is_ignored_name(entry.name) and is_cache_dir(entry.path, caches):
            scan.ignored.append((entry.path, "cache folders"))
    paths, targets = [], []
    seen: dict[tuple[int, int], tuple[str, Path]] = {}
    for idx, name in enumerate(classes):
        files, broken, ignored = list_class_files(root / name, seen, caches)
        if not files and not broken:
            raise InputError(f"class folder {root / name} has no images (files with an image extension Pillow reads: "
                             f"{', '.join(sorted(image_extensions())[:12])}, ...); fix: add images or remove the folder")
        paths += files
        targets += [idx] * len(files)
        scan.bad += broken
        scan.bad_targets += [idx] * len(broken)
        scan.ignored += ignored
    return check_into(scan, paths, targets, verify=verify, show_progress=show_progress, desc=f"checking {root.name}/ images",
                      resize=resize)


# ----------------------------------------------------------------------------- reports and errors


def bad_images_report(scans: Sequence[FolderScan]) -> str:
    """The one report of every unreadable file: a header, then "path: reason" per file."""
    bad = [b for s in scans for b in s.bad]
    lines = [f"{len(bad)} image file{'s' if len(bad) != 1 else ''} Pillow cannot read:"]
    lines += [f"  {display_path(b.path)}: {display_line(b.reason)}" for b in bad]
    return "\n".join(lines)


def report_bad_images(scans: Sequence[FolderScan], skip: bool) -> str | None:
    """Before training: with unreadable files, print their report on stderr and stop (InputError, exit 2) unless
    `skip`; skipping still prints it. Also refuses a class left without a usable image. Returns the report, if any."""
    bad = [b for s in scans for b in s.bad]
    report = bad_images_report(scans) if bad else None
    if bad and not skip:
        if len(bad) == 1:
            raise InputError(f"cannot read image {bad[0].path}: {bad[0].reason}; fix: remove or replace the file, or "
                             "pass --skip_bad_images to leave it out")
        print(report, file=sys.stderr)
        raise InputError(f"{len(bad)} image files cannot be read (listed above); fix: remove or replace them, or pass "
                         "--skip_bad_images to leave them out")
    if report:
        print(f"{report}\n  (--skip_bad_images: left out)", file=sys.stderr)
    for scan in scans:
        used, _ = scan.counts()
        empty = [c for c, n in zip(scan.classes, used) if n == 0]
        if empty:
            raise InputError(f"class folder {scan.root / empty[0]} has no usable image (every image in it is unreadable, "
                             "see above): add readable images or remove the folder")
    return report


def check_disjoint(first: FolderScan, second: FolderScan) -> None:
    """InputError when one file is in both splits (a class folder of one linked into the other, or a file hard-linked
    into both: same (st_dev, st_ino)): validation would measure images the network trained on."""
    real = {os.path.realpath(p): p for p, _ in first.samples}
    inodes = {key: p for p, _ in first.samples if (key := file_key(p)) is not None}
    shared = []  # (file of the first split, the same file in the second, how)
    for p, _ in second.samples:
        other, how = real.get(os.path.realpath(p)), "symbolic links"
        if other is None and (key := file_key(p)) is not None:
            other, how = inodes.get(key), "hard links"
        if other is not None:
            shared.append((other, p, how))
    if shared:
        first_of, second_of, how = shared[0]
        raise InputError(f"{len(shared)} image file{'s are' if len(shared) > 1 else ' is'} in both {first.root} and "
                         f"{second.root} (through {how}; first: {first_of} = {second_of}): validation must not see "
                         "training images; fix: make the two splits hold different files")


def check_same_classes(first: Sequence[str], second: Sequence[str], first_name: str, second_name: str, fix: str) -> None:
    """InputError naming the differing classes unless `first` and `second` are the same list."""
    if list(first) == list(second):
        return
    only_a, only_b = sorted(set(first) - set(second)), sorted(set(second) - set(first))
    if only_a or only_b:
        what = f"only in {first_name}: {only_a or 'none'}; only in {second_name}: {only_b or 'none'}"
    else:
        i = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        what = f"same names in another order (class {i} is {first[i]!r} in {first_name}, {second[i]!r} in {second_name})"
    raise InputError(f"the classes of {first_name} and {second_name} differ: {what}; fix: {fix}")


def check_listed(root: str | Path, classes: list[str], samples: Sequence[tuple[str, int]], *, verify: bool = True,
                 show_progress: bool = True, resize: int | None = None) -> FolderScan:
    """A FolderScan of files listed elsewhere (a recorded split): each is checked like scan_folder's."""
    scan = FolderScan(Path(root), list(classes))
    return check_into(scan, [p for p, _ in samples], [t for _, t in samples], verify=verify, show_progress=show_progress,
                      desc="checking images", resize=resize)


def check_into(scan: FolderScan, paths: list[str], targets: list[int], *, verify: bool, show_progress: bool,
               desc: str, resize: int | None = None) -> FolderScan:
    """Check each file (check_images, unless not `verify`) and add it to the scan's samples or to its bad images."""
    reasons = (check_images(paths, show_progress=show_progress, desc=desc, resize=resize) if verify
               else [None] * len(paths))
    for path, target, reason in zip(paths, targets, reasons):
        if reason is None:
            scan.samples.append((path, target))
        else:
            scan.bad.append(BadImage(path, reason))
            scan.bad_targets.append(target)
    return scan
