"""The folder source: `root/train/<class>/*.png|jpg|jpeg`, optionally `root/test/<class>/...`.
Images in sub-folders of a class folder belong to that class.

Decoding tens of thousands of small files takes seconds, so each split is decoded once,
in worker processes, into an uncompressed .npz under `data.cache_dir`. Later runs only
list and stat the files and load that array. The cache is keyed on the relative path,
size and mtime of every file, so an added, removed or edited image is noticed and the
split is decoded again.

torch is never imported here: decoding needs nothing but numpy and PIL, and a spawned
worker (on systems without fork) imports this module.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from cifar_bp.cifar10 import NUM_CLASSES, SIDE
from cifar_bp.errors import CliError

if TYPE_CHECKING:
    from cifar_bp.config import DataConfig

EXTENSIONS = (".png", ".jpg", ".jpeg")
EXPECTED = "train/<class>/*.png|*.jpg"
CACHE_VERSION = "2"  # bump when decoding changes, so that existing caches are rebuilt
CHUNK = 500  # files per task: large enough to amortise pickling, small enough for progress
WORKERS = 2
# Starting worker processes costs more than decoding a small folder in-process, and a
# small folder decodes too fast for a progress display to be worth its lines.
POOL_MIN_FILES = 2000
PROGRESS_MIN_FILES = 1000


@dataclass
class Listing:
    """The images of one split in load order, and the key that identifies their contents."""

    folder: Path
    classes: tuple[str, ...]
    files: list[str]  # relative to `folder`, '/'-separated
    labels: np.ndarray  # int64
    key: str


Arrays = tuple[np.ndarray, np.ndarray]  # uint8 N×3×32×32 images, int64 N labels


@dataclass
class FolderData:
    """What a folder holds, as plain arrays: `data.py` turns them into tensors."""

    train: Arrays
    test: Arrays | None
    classes: tuple[str, ...]
    notes: list[str]


def load_folder(cfg: DataConfig) -> FolderData:
    """Both splits of `cfg.root`, decoded once and cached; no test/ means `test` is None."""
    root = Path(cfg.root)
    check_root(root)
    train = list_split(root / "train")
    if len(train.classes) > NUM_CLASSES:
        raise CliError(
            f"{root / 'train'} has {len(train.classes)} class folders; the network has "
            f"{NUM_CLASSES} outputs, so at most {NUM_CLASSES} classes are supported"
        )
    notes: list[str] = []
    cache_dir = Path(cfg.cache_dir)
    data = FolderData(load_split(train, cache_dir, notes), None, train.classes, notes)
    test_dir = root / "test"
    if test_dir.exists():
        data.test = load_split(list_split(test_dir, train.classes), cache_dir, notes)
    else:
        notes.append(
            f"{root} has no test/ folder: evaluating on the validation split "
            f"(data.val_size={cfg.val_size} training images held out)"
        )
    return data


def check_root(root: Path) -> None:
    if not root.exists():
        raise CliError(f"data.root {root} does not exist (expected {root}/{EXPECTED})")
    if not root.is_dir():
        raise CliError(f"data.root {root} is a file, not a directory")
    if not (root / "train").is_dir():
        raise CliError(f"data.root {root} has no train/ folder (expected {root}/{EXPECTED})")


def load_to_score(cfg: DataConfig, classes: tuple[str, ...]) -> tuple[Arrays, Path]:
    """The images of a folder other than a run's own, labelled by the run's `classes`:
    `root/test/` if there is one, else `root/train/`, else root's own class folders. No
    training split is needed: every image found is scored."""
    root = Path(cfg.root)
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "does not exist"
        raise CliError(f"data.root {root} {what} (expected {root}/<class>/*.png|*.jpg)")
    folder = next((root / s for s in ("test", "train") if (root / s).is_dir()), root)
    # By name: the folder's own sorted names would number its classes afresh.
    unknown = [name for name in _class_folders(folder) if name not in classes]
    if unknown:
        raise CliError(
            f"{folder} has class folders the checkpoint does not know: {', '.join(unknown)} "
            f"(its classes: {', '.join(classes)})"
        )
    return load_split(list_split(folder, classes), Path(cfg.cache_dir), []), folder


def list_split(folder: Path, classes: tuple[str, ...] | None = None) -> Listing:
    """List and stat every image of a split. `classes` (train's) fixes the label of each
    class folder; without it the sorted folder names are the classes."""
    if not folder.is_dir():
        raise CliError(f"{folder} is not a directory")
    names = _class_folders(folder)
    if not names:
        raise CliError(f"{folder} has no class folders (expected {folder}/<class>/*.png|*.jpg)")
    defined, classes = classes is None, classes or tuple(names)
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise CliError(f"{folder} has class folders that train/ lacks: {', '.join(unknown)}")
    per_class = [_stat_images(folder / name) for name in names]
    # A class folder defines a label even when empty, and shifts every later one.
    empty = [name for name, (found, _) in zip(names, per_class, strict=True) if not found]
    if defined and empty and len(empty) < len(names):
        raise CliError(
            f"class folder {folder / empty[0]} has no images (*.png, *.jpg, *.jpeg): add "
            "some or remove it, as it would still take a class index"
        )
    files = [
        f"{name}/{file}"
        for name, (found, _) in zip(names, per_class, strict=True)
        for file in found
    ]
    if not files:
        raise CliError(f"{folder} has no images (*.png, *.jpg, *.jpeg) in its class folders")
    labels = np.repeat([classes.index(n) for n in names], [len(f) for f, _ in per_class])
    ranks = np.concatenate([np.arange(len(found)) for found, _ in per_class])
    # Interleave the classes, like the shuffled official batches: a data.train_size
    # subset (the first N images) then covers every class instead of the first few.
    order = np.lexsort((labels, ranks))
    files = [files[i] for i in order]
    stats = np.concatenate([stat for _, stat in per_class])[order]
    digest = hashlib.sha256(f"{CACHE_VERSION}\n{classes}\n".encode())
    digest.update("\n".join(files).encode())
    digest.update(stats.tobytes())
    return Listing(folder, classes, files, labels[order].astype(np.int64), digest.hexdigest())


def _stat_images(folder: Path) -> tuple[list[str], np.ndarray]:
    """The image paths under a class folder (sub-folders included), relative to it and
    sorted, and their (size, mtime_ns) as int64 rows.

    Written for speed (a warm start stats 50,000 files): one scandir pass per folder."""
    found: list[tuple[str, os.DirEntry]] = []
    try:
        _scan(folder, "", found)
        found.sort(key=itemgetter(0))
        stats = [e.stat() for _, e in found]
    except OSError as err:
        raise CliError(f"cannot read {err.filename or folder}: {err.strerror or err}") from None
    sizes = np.fromiter([st.st_size for st in stats], np.int64, len(stats))
    mtimes = np.fromiter([st.st_mtime_ns for st in stats], np.int64, len(stats))
    return [name for name, _ in found], np.stack([sizes, mtimes], axis=1)


def _scan(folder: Path | str, prefix: str, found: list[tuple[str, os.DirEntry]]) -> None:
    with os.scandir(folder) as entries:
        for e in entries:
            name = e.name
            if name[0] == ".":
                continue
            if name.lower().endswith(EXTENSIONS) and e.is_file():
                found.append((prefix + name, e))
            elif e.is_dir(follow_symlinks=False):  # a linked folder could loop back
                _scan(e.path, f"{prefix}{name}/", found)


def _class_folders(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
    except OSError as err:
        raise CliError(f"cannot read {folder}: {err.strerror or err}") from None


def load_split(listing: Listing, cache_dir: Path, notes: list[str]) -> Arrays:
    """The split from the cache when its key matches, else decoded and cached again."""
    path = cache_path(cache_dir, listing.folder)
    images = read_cache(path, listing.key, notes)
    if images is None:
        images = decode_images(listing.folder, listing.files)
        write_cache(path, listing, images, notes)
    return images, listing.labels


def cache_path(cache_dir: Path, folder: Path) -> Path:
    """One cache file per split folder, so a changed folder overwrites its own stale copy."""
    digest = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    return cache_dir / f"folder-{folder.name}-{digest}.npz"


def read_cache(path: Path, key: str, notes: list[str]) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as cached:
            if str(cached["key"]) != key:
                notes.append(f"the images changed since {path} was written: decoded them again")
                return None
            return cached["images"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        notes.append(f"could not read the image cache {path} ({err}): decoded the images again")
        return None


def write_cache(path: Path, listing: Listing, images: np.ndarray, notes: list[str]) -> None:
    """Write to a temporary file and rename it, so a crash never leaves half a cache."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique per process, and created with the umask's permissions (mkstemp's are 0600).
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "xb") as out:
                np.savez(
                    out, key=np.array(listing.key), images=images, labels=listing.labels,
                    classes=np.array(listing.classes),
                )  # fmt: skip
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as err:
        notes.append(
            f"could not write the image cache in {path.parent} ({err.strerror or err}): "
            "the images will be decoded again on the next run"
        )


def decode_images(folder: Path, files: list[str]) -> np.ndarray:
    """uint8 N×3×32×32 images; the first file that fails stops the run, named."""
    paths = [os.path.join(folder, file) for file in files]
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    images = np.empty((len(paths), 3, SIDE, SIDE), dtype=np.uint8)
    done = 0
    with _mapper(len(paths)) as mapper, _progress(len(paths), folder) as advance:
        for chunk in mapper(_decode_chunk, chunks):
            if isinstance(chunk, str):
                raise CliError(chunk)
            images[done : done + len(chunk)] = chunk.transpose(0, 3, 1, 2)
            done += len(chunk)
            advance(done)
    return images


@contextlib.contextmanager
def _mapper(count: int) -> Iterator[Callable]:
    """`map`, or a process pool's map when the folder is big enough to pay for one."""
    workers = min(WORKERS, os.cpu_count() or 1)
    if count < POOL_MIN_FILES or workers < 2:
        yield map
        return
    pool = ProcessPoolExecutor(workers, mp_context=get_context(_start_method()))
    try:
        yield pool.map
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _start_method() -> str:
    """fork on Linux: the workers run only PIL and numpy (never torch or CUDA), and spawn
    would re-run the caller's main script in each worker, which breaks unguarded scripts."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _decode_chunk(paths: list[str]) -> np.ndarray | str:
    """N×32×32×3 uint8 pixels, or the message for the first file that fails."""
    pixels = np.empty((len(paths), SIDE, SIDE, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                if image.size != (SIDE, SIDE):
                    width, height = image.size
                    return f"{path}: {width}×{height} pixels; only 32×32 images are accepted"
                # Grayscale is replicated to RGB; an alpha channel is dropped.
                pixels[i] = np.asarray(eight_bit(image).convert("RGB"))
        except UnidentifiedImageError:
            return f"{path}: not a PNG or JPEG image"
        except (OSError, ValueError, SyntaxError) as err:
            return f"{path}: cannot be decoded ({err})"
    return pixels


def eight_bit(img: Any) -> Any:
    """A 16-bit or float greyscale PIL image brought to 8 bits by its range (others as
    they are). PIL's own conversion clips these at 255, which turns a 16-bit photo white."""
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img
    values = np.asarray(img, dtype=np.float64)
    peak = float(values.max(initial=0.0))
    # 16-bit modes span 0..65535; a float image usually 0..1; "I" is 16-bit from a PNG.
    if img.mode.startswith("I;16") or peak > 255:
        top = 65535.0
    else:
        top = 1.0 if img.mode == "F" and peak <= 1.0 else 255.0
    scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled)


@contextlib.contextmanager
def _progress(total: int, folder: Path) -> Iterator[Callable[[int], None]]:
    """A transient rich bar on a terminal, else a line per tenth done; both on stderr.
    Nothing for a small folder."""
    title = f"decoding {total:,} images in {folder}"
    if total < PROGRESS_MIN_FILES:
        yield lambda done: None
        return
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        # markup=False: a folder named "photos[v2]" is shown as named, not read as a style.
        columns = (TextColumn("{task.description}", markup=False), BarColumn(),
                   MofNCompleteColumn(), TimeRemainingColumn())  # fmt: skip
        console = Console(stderr=True, markup=False)
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(title, total=total)
            yield lambda done: bar.update(task, completed=done)
        return
    print(f"{title} (once; later runs use the cache)", file=sys.stderr, flush=True)
    shown = [0]

    def advance(done: int) -> None:
        tenth = done * 10 // total
        if tenth > shown[0]:
            shown[0] = tenth
            print(f"  decoded {done:,}/{total:,}", file=sys.stderr, flush=True)

    yield advance
