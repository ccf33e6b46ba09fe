"""On-disk format of mask sets (concept stores and unit masks).

A store is a directory::

    manifest.json   format name, version, kind, grid, sizes, per file its size and CRC-32,
                    and the CRC-32 of the manifest itself ("manifest_crc32")
    offsets.bin     int64 (n_masks + 1)         little-endian raw arrays
    images.bin      int32 (n_entries)
    slots.bin       int64 (n_entries)
    counts.bin      int32 (n_entries)
    words.bin       uint64 (n_slots x words_per_image), memory-mapped on open
    table.parquet   one row per mask (names, categories, counts, ...)

Writes go to a temporary sibling directory that is moved into place at the end (see
:mod:`pyneuron.engine.atomic`), so an interrupted write never leaves a half-written store under
the final name, nor removes the store it replaces.

Opening checks every invariant that costs no pass over the bitsets: the manifest's
fields and checksum, file sizes, the CRC-32 of the index files and the table, the index
structure (offsets, image order, container kinds against their counts, every bitset
used once) and the table's per-mask totals. With ``verify`` (default for bitsets up to
256 MiB) it also checks the bitsets' CRC-32, popcounts and padding bits. Every size the
manifest claims is checked against the files and the other counts before anything is
allocated (a words file no larger than the index can use, a grid whose ``n_images`` the
masks make plausible, see :func:`_check_image_count`).

Opening reads every file through one handle on the directory, so a store replaced by
another process meanwhile (``save(overwrite=True)``) is read whole, old or new, never
reported corrupt for being half of each (see :func:`load`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import time
import zlib
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from ..errors import PyneuronError, StoreError
from . import _native
from .atomic import (
    OutputKind,
    commit_directory,
    fsync_file,
    recover,
    refuse_existing,
    temporary_sibling,
)
from .grid import Grid

FORMAT_NAME = "pyneuron.maskset"
#: Version 2 checksums the manifest itself; version 1 stores (without) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
INDEX_FILES = {"offsets.bin": "<i8", "images.bin": "<i4", "slots.bin": "<i8", "counts.bin": "<i4"}
WORDS_FILE = "words.bin"
TABLE_FILE = "table.parquet"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (*INDEX_FILES, WORDS_FILE, TABLE_FILE)
# Bitsets are checksummed on open when the words file is at most this large.
AUTO_VERIFY_BYTES = 256 * 2**20
#: Largest ``n_images`` a store opens with whatever images its masks touch; beyond it,
#: masks must touch images past half of ``n_images`` (see :func:`_check_image_count`).
PLAUSIBLE_IMAGES = 2**24
#: Tries to open a store that other processes replace meanwhile (see :func:`load`).
OPEN_ATTEMPTS = 8
# Files of a store are opened relative to one directory handle where the OS allows it.
_DIRECTORY_HANDLES = os.open in os.supports_dir_fd and hasattr(os, "O_DIRECTORY")
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def crc32_of_file(path: Path, chunk: int = 16 * 2**20) -> int:
    """CRC-32 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return _crc32_of_handle(handle, chunk)


def _crc32_of_handle(handle: BinaryIO, chunk: int = 16 * 2**20) -> int:
    """CRC-32 of an open file from its start, read in chunks."""
    handle.seek(0)
    crc = 0
    while block := handle.read(chunk):
        crc = zlib.crc32(block, crc)
    return crc


def write_directory(
    staging: Path,
    *,
    kind: str,
    grid: Grid,
    index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    words: np.ndarray | None,
    words_crc32: int | None,
    table: pd.DataFrame,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write a mask set into ``staging``; ``words`` None means words.bin is already there."""
    files: dict[str, dict[str, int]] = {}
    for (name, dtype), array in zip(INDEX_FILES.items(), index):
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        (staging / name).write_bytes(data)
        files[name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    words_path = staging / WORDS_FILE
    if words is not None:
        data = np.ascontiguousarray(words, dtype="<u8").tobytes()
        words_path.write_bytes(data)
        words_crc32 = zlib.crc32(data)
    files[WORDS_FILE] = {"bytes": words_path.stat().st_size, "crc32": int(words_crc32 or 0)}
    table.to_parquet(staging / TABLE_FILE, index=False)
    files[TABLE_FILE] = {
        "bytes": (staging / TABLE_FILE).stat().st_size,
        "crc32": crc32_of_file(staging / TABLE_FILE),
    }
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "grid": {"n_images": grid.n_images, "height": grid.height, "width": grid.width},
        "n_masks": int(index[0].shape[0] - 1),
        "n_entries": int(index[1].shape[0]),
        "files": files,
        "metadata": metadata or {},
    }
    manifest["manifest_crc32"] = manifest_crc32(manifest)
    for name in files:
        fsync_file(staging / name)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    fsync_file(staging / MANIFEST_FILE)


#: How outputs are named in messages, by store kind.
KIND_NAMES = {"concepts": "pyneuron concept store", "units": "pyneuron unit-mask store"}


def output_kind(kind: str) -> OutputKind:
    """The :class:`~pyneuron.engine.atomic.OutputKind` of stores of ``kind``: a directory whose
    manifest names this format and kind (``overwrite`` replaces nothing else)."""

    def recognise(path: Path) -> bool:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
        return (
            isinstance(manifest, dict)
            and manifest.get("format") == FORMAT_NAME
            and manifest.get("kind") == kind
        )

    return OutputKind(KIND_NAMES.get(kind, f"pyneuron {kind} store"), recognise)


def save(
    path: str | os.PathLike[str],
    *,
    kind: str,
    grid: Grid,
    index: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    words: np.ndarray,
    table: pd.DataFrame,
    metadata: dict[str, Any] | None,
    overwrite: bool,
) -> Path:
    """Write a mask set held in memory to a new directory, atomically."""
    path = Path(path)
    refuse_existing(path, overwrite, output_kind(kind))
    staging = temporary_sibling(path)
    try:
        write_directory(
            staging,
            kind=kind,
            grid=grid,
            index=index,
            words=words,
            words_crc32=None,
            table=table,
            metadata=metadata,
        )
        commit_directory(staging, path, overwrite, output_kind(kind))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _corrupt(path: Path, what: str) -> StoreError:
    return StoreError(
        f"store {path} is corrupt or incomplete: {what}; rebuild it (the original data is "
        "not recoverable from a damaged store)"
    )


def manifest_crc32(manifest: dict[str, Any]) -> int:
    """CRC-32 of a manifest's canonical JSON without its ``manifest_crc32`` field."""
    body = {k: v for k, v in manifest.items() if k != "manifest_crc32"}
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _is_int(value: Any, low: int = 0, high: int = 2**63 - 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _parse_manifest(path: Path, raw: bytes, kind: str) -> dict[str, Any]:
    """The manifest read from ``raw``, every field checked, or a :class:`StoreError`
    saying what is wrong."""
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError, UnicodeDecodeError) as error:
        raise _corrupt(path, f"unreadable {MANIFEST_FILE} ({type(error).__name__})") from None
    if not isinstance(manifest, dict):
        raise _corrupt(path, f"{MANIFEST_FILE} is not a JSON object")
    fmt, version = manifest.get("format"), manifest.get("version")
    if fmt != FORMAT_NAME:
        raise StoreError(f"{path} is not a pyneuron store (format {fmt!r:.60})")
    if _is_int(version) and version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer pyneuron (store format version {version}, this "
            f"version reads up to {FORMAT_VERSION}); upgrade pyneuron to open it"
        )
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise _corrupt(path, f"unknown format version {version!r:.60} in {MANIFEST_FILE}")
    try:
        intact = version < 2 or manifest.get("manifest_crc32") == manifest_crc32(manifest)
    except (RecursionError, ValueError):  # nested too deeply to encode again
        intact = False
    if not intact:
        raise _corrupt(path, f"checksum of {MANIFEST_FILE} does not match (edited or damaged)")
    if manifest.get("kind") != kind:
        raise StoreError(f"{path} holds {str(manifest.get('kind'))[:60]}, not {kind}")
    grid = manifest.get("grid")
    if not isinstance(grid, dict) or sorted(grid) != ["height", "n_images", "width"]:
        raise _corrupt(path, f"'grid' of {MANIFEST_FILE} must hold n_images, height, width")
    try:
        manifest["grid"] = Grid(**grid)
    except PyneuronError as error:
        raise _corrupt(path, f"bad grid in {MANIFEST_FILE}: {error}") from None
    for field in ("n_masks", "n_entries"):
        if not _is_int(manifest.get(field), high=2**60):
            raise _corrupt(path, f"{field!r} of {MANIFEST_FILE} must be an integer >= 0")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _corrupt(path, f"'files' of {MANIFEST_FILE} must be an object")
    for name in [*INDEX_FILES, WORDS_FILE, TABLE_FILE]:
        entry = files.get(name)
        if not (
            isinstance(entry, dict)
            and _is_int(entry.get("bytes"))
            and _is_int(entry.get("crc32"), high=2**32 - 1)
        ):
            raise _corrupt(path, f"{MANIFEST_FILE} lacks the size and CRC-32 of {name}")
    if not isinstance(manifest.setdefault("metadata", {}), dict):
        raise _corrupt(path, f"'metadata' of {MANIFEST_FILE} must be an object")
    return manifest


class _Replaced(Exception):
    """The store was replaced while its files were being opened by path."""


class _StoreDirectory:
    """A store directory, opened once.

    Where the system allows it (Linux, macOS), every file is opened relative to one
    handle on the directory, so all of them come from the same directory even when
    another process replaces ``path`` meanwhile (:mod:`pyneuron.engine.atomic` swaps whole
    directories, then deletes the old one). :meth:`replaced` tells whether that
    happened, so that an open that failed half-way can be tried again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        try:
            if _DIRECTORY_HANDLES:
                self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _O_CLOEXEC)
                self.identity = os.fstat(self.fd)
            else:
                self.identity = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise StoreError(f"no store at {path}: not a directory") from None
        except OSError as error:
            raise StoreError(f"cannot open the store at {path}: {error.strerror}") from None
        if not stat.S_ISDIR(self.identity.st_mode):
            self.close()
            raise StoreError(f"no store at {path}: not a directory")

    def open(self, name: str) -> BinaryIO | None:
        """The file ``name`` opened for reading; None if it is missing or not a file."""
        try:
            if self.fd is not None:
                fd = os.open(name, os.O_RDONLY | _O_CLOEXEC, dir_fd=self.fd)
            else:
                fd = os.open(self.path / name, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except BaseException:
            os.close(fd)
            raise
        if not regular:
            os.close(fd)
            return None
        return os.fdopen(fd, "rb")

    def replaced(self) -> bool:
        """Whether ``path`` no longer names the directory opened (or it was deleted)."""
        try:
            now = os.stat(self.path)
        except OSError:
            return True
        if self.fd is not None:
            held = os.fstat(self.fd)
            return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino) or held.st_nlink == 0
        before = self.identity
        return (now.st_dev, now.st_ino, now.st_mtime_ns) != (
            before.st_dev,
            before.st_ino,
            before.st_mtime_ns,
        )

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def load(path: str | os.PathLike[str], *, kind: str, verify: bool | None) -> dict[str, Any]:
    """Read a store directory and check it (see the module docstring); the words are
    memory-mapped, not read, unless ``verify``.

    Every file is read from the same directory even while another process replaces
    ``path`` (``save(overwrite=True)``); an open that the replacement cut short (the old
    directory deleted under it) is tried again, up to :data:`OPEN_ATTEMPTS` times.
    """
    path = Path(path)
    recover(path)
    for attempt in range(OPEN_ATTEMPTS):
        if attempt:
            time.sleep(0.001 * attempt)
        directory = _StoreDirectory(path)
        try:
            return _load_from(directory, kind, verify)
        except _Replaced:
            pass
        except (StoreError, OSError) as error:
            if not directory.replaced():
                if isinstance(error, StoreError):
                    raise
                raise StoreError(f"cannot read the store at {path}: {error}") from None
        finally:
            directory.close()
    raise StoreError(
        f"the store at {path} was replaced {OPEN_ATTEMPTS} times while it was being opened "
        "(another process keeps rewriting it); open it once that process is done"
    )


def _load_from(directory: _StoreDirectory, kind: str, verify: bool | None) -> dict[str, Any]:
    """:func:`load` from an opened directory. Every size the manifest claims is checked
    against the files and the index before anything is allocated or mapped."""
    path = directory.path
    manifest_file = directory.open(MANIFEST_FILE)
    if manifest_file is None:
        raise StoreError(f"{path} is not a pyneuron store (no {MANIFEST_FILE})")
    with manifest_file:
        manifest = _parse_manifest(path, manifest_file.read(), kind)
    grid: Grid = manifest["grid"]
    files = manifest["files"]
    n_masks = manifest["n_masks"]
    with ExitStack() as stack:
        handles: dict[str, BinaryIO] = {}
        for name in DATA_FILES:
            handle = directory.open(name)
            if handle is None:
                raise _corrupt(path, f"{name} is missing")
            handles[name] = stack.enter_context(handle)
        if directory.fd is None and directory.replaced():
            # Opened by path, the files may come from two versions: try again.
            raise _Replaced
        sizes = {name: os.fstat(handle.fileno()).st_size for name, handle in handles.items()}
        _check_sizes(path, manifest, sizes)
        words_bytes = sizes[WORDS_FILE]

        index = []
        for name, dtype in INDEX_FILES.items():
            array = np.fromfile(handles[name], dtype=dtype)
            if array.nbytes != sizes[name]:
                raise _corrupt(path, f"{name} could not be read whole")
            if zlib.crc32(array) != files[name]["crc32"]:
                raise _corrupt(path, f"checksum of {name} does not match")
            index.append(array)
        table_bytes = handles[TABLE_FILE].read()
        if zlib.crc32(table_bytes) != files[TABLE_FILE]["crc32"]:
            raise _corrupt(path, f"checksum of {TABLE_FILE} does not match")
        if verify is None:
            verify = words_bytes <= AUTO_VERIFY_BYTES
        if verify and _crc32_of_handle(handles[WORDS_FILE]) != files[WORDS_FILE]["crc32"]:
            raise _corrupt(path, f"checksum of {WORDS_FILE} does not match")
        _check_image_count(path, grid, index[1])
        if words_bytes:
            words = np.memmap(handles[WORDS_FILE], dtype="<u8", mode="r")
        else:
            words = np.zeros(0, dtype="<u8")
    words = words.astype(np.uint64, copy=False).reshape(-1, grid.words_per_image)
    try:
        native = _native.NativeMaskSet(grid.n_images, grid.pixels, *index, words.reshape(-1))
        if verify:
            native.verify_words()
    except ValueError as error:
        raise _corrupt(path, str(error)) from None
    try:
        table = pd.read_parquet(io.BytesIO(table_bytes))
    except Exception as error:  # pyarrow raises several types for damaged files
        raise _corrupt(path, f"unreadable {TABLE_FILE} ({error})") from None
    if len(table) != n_masks:
        raise _corrupt(path, f"{TABLE_FILE} has {len(table)} rows for {n_masks} masks")
    offsets, counts = index[0], index[3]
    for column, totals in (
        ("pixels", pixel_counts(offsets, counts)),
        ("images", np.diff(offsets)),
    ):
        if column not in table or not np.array_equal(table[column].to_numpy(), totals):
            raise _corrupt(path, f"the {column!r} column of {TABLE_FILE} disagrees with the index")
    return {
        "grid": grid,
        "index": index,
        "words": words,
        "table": table,
        "metadata": manifest["metadata"],
        "verified": verify,
    }


def _check_image_count(path: Path, grid: Grid, images: np.ndarray) -> None:
    """Raise :class:`StoreError` if the grid claims far more images than the masks touch.

    Nothing on disk records how many images a store was built on except the largest
    image id its masks touch, and the engine's working memory grows with ``n_images``:
    a grid of up to :data:`PLAUSIBLE_IMAGES` images is taken as written; a larger one
    opens only if some mask touches an image in its second half.
    """
    touched = int(images.max()) + 1 if images.size else 0
    if grid.n_images > max(PLAUSIBLE_IMAGES, 2 * touched):
        last = f"no image past image {touched - 1}" if touched else "no image at all"
        raise _corrupt(
            path,
            f"'grid.n_images' of {MANIFEST_FILE} is {grid.n_images}, but the masks touch "
            f"{last} (images.bin); a grid of more than {PLAUSIBLE_IMAGES} images must have "
            "masks in its second half, so the manifest was edited or damaged",
        )


def _check_sizes(path: Path, manifest: dict[str, Any], sizes: dict[str, int]) -> None:
    """Raise :class:`StoreError` unless the files' sizes agree with the manifest and the
    manifest's counts agree with each other: nothing that a store's files cannot back is
    ever allocated (a words file claimed 2**40 bytes long, a grid edited larger)."""
    grid: Grid = manifest["grid"]
    files = manifest["files"]
    n_masks, n_entries = manifest["n_masks"], manifest["n_entries"]
    expected_bytes = {
        "offsets.bin": 8 * (n_masks + 1),
        "images.bin": 4 * n_entries,
        "slots.bin": 8 * n_entries,
        "counts.bin": 4 * n_entries,
    }
    for name in DATA_FILES:
        size = sizes[name]
        if size != files[name]["bytes"]:
            raise _corrupt(
                path, f"{name} has {size} bytes, expected {files[name]['bytes']} (truncated?)"
            )
        if size != expected_bytes.get(name, size):
            field = "n_masks" if name == "offsets.bin" else "n_entries"
            raise _corrupt(
                path,
                f"{name} has {size} bytes, expected {expected_bytes[name]} for the "
                f"{field!r} of {MANIFEST_FILE} (truncated?)",
            )
    word_bytes = 8 * grid.words_per_image
    if sizes[WORDS_FILE] % word_bytes:
        raise _corrupt(path, f"{WORDS_FILE} does not hold whole images")
    n_slots = sizes[WORDS_FILE] // word_bytes
    if n_slots > n_entries:
        raise _corrupt(
            path,
            f"{WORDS_FILE} holds {n_slots} bitsets of {grid.height}x{grid.width} pixels but "
            f"the index has only {n_entries} entries ('n_entries' of {MANIFEST_FILE}), and "
            "each bitset belongs to one entry; the file or the manifest's 'grid' was changed",
        )
    if n_entries > n_masks * grid.n_images:
        raise _corrupt(
            path,
            f"'n_entries' of {MANIFEST_FILE} ({n_entries}) exceeds 'n_masks' x "
            f"'grid.n_images' ({n_masks} x {grid.n_images}): a mask has at most one entry "
            "per image",
        )


def pixel_counts(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Set pixels per mask from the CSR offsets and per-entry counts."""
    n_masks = offsets.shape[0] - 1
    owner = np.repeat(np.arange(n_masks), np.diff(offsets))
    return np.bincount(owner, weights=counts, minlength=n_masks).astype(np.int64)
