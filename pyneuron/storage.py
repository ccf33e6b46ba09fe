"""On-disk format of mask sets (concept stores and unit masks).

A store is a directory::

    manifest.json   format name, version, kind, grid, sizes, and per file its size and CRC-32
    offsets.bin     int64 (n_masks + 1)         little-endian raw arrays
    images.bin      int32 (n_entries)
    slots.bin       int64 (n_entries)
    counts.bin      int32 (n_entries)
    words.bin       uint64 (n_slots x words_per_image), memory-mapped on open
    table.parquet   one row per mask (names, categories, counts, ...)

Writes go to a temporary sibling directory that is renamed into place at the end,
so an interrupted write never leaves a half-written store under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import StoreError
from .grid import Grid

FORMAT_NAME = "pyneuron.maskset"
FORMAT_VERSION = 1
INDEX_FILES = {"offsets.bin": "<i8", "images.bin": "<i4", "slots.bin": "<i8", "counts.bin": "<i4"}
WORDS_FILE = "words.bin"
TABLE_FILE = "table.parquet"
MANIFEST_FILE = "manifest.json"
# Bitsets are checksummed on open when the words file is at most this large.
AUTO_VERIFY_BYTES = 256 * 2**20


def fsync_file(path: Path) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def temporary_sibling(path: Path) -> Path:
    """A fresh directory next to ``path`` (same filesystem, so a rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))


def crc32_of_file(path: Path, chunk: int = 16 * 2**20) -> int:
    """CRC-32 of a file, read in chunks."""
    crc = 0
    with open(path, "rb") as handle:
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
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "grid": {"n_images": grid.n_images, "height": grid.height, "width": grid.width},
        "n_masks": int(index[0].shape[0] - 1),
        "n_entries": int(index[1].shape[0]),
        "files": files,
        "metadata": metadata or {},
    }
    for name in files:
        fsync_file(staging / name)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    fsync_file(staging / MANIFEST_FILE)


def refuse_existing(path: Path, overwrite: bool, option: str = "overwrite=True") -> None:
    """Raise ``FileExistsError`` if ``path`` holds anything and ``overwrite`` is false
    (an empty directory counts as free)."""
    if path.exists() and not overwrite and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists; pass {option} to replace it")


def commit_directory(staging: Path, path: Path, overwrite: bool) -> None:
    """Move a fully written staging directory to ``path`` atomically.

    An existing empty directory is replaced; anything else needs ``overwrite``.
    """
    if path.exists():
        try:
            refuse_existing(path, overwrite)
        except FileExistsError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        old = temporary_sibling(path)
        os.rename(path, old / "previous")
        try:
            os.rename(staging, path)
        except BaseException:
            os.rename(old / "previous", path)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, path)


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
    refuse_existing(path, overwrite)
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
        commit_directory(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _corrupt(path: Path, what: str) -> StoreError:
    return StoreError(
        f"store {path} is corrupt or incomplete: {what}; rebuild it (the original data is "
        "not recoverable from a damaged store)"
    )


def load(path: str | os.PathLike[str], *, kind: str, verify: bool | None) -> dict[str, Any]:
    """Read a store directory; the words are memory-mapped, not read."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"no store at {path}: not a directory")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise StoreError(f"{path} is not a pyneuron store (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(manifest_path.read_text())
        version = int(manifest["version"])
        fmt = manifest["format"]
        found_kind = manifest["kind"]
    except (ValueError, KeyError, TypeError) as error:
        raise _corrupt(path, f"unreadable {MANIFEST_FILE} ({error})") from None
    if fmt != FORMAT_NAME:
        raise StoreError(f"{path} is not a pyneuron store (format {fmt!r})")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path} was written by a newer pyneuron (store format version {version}, this "
            f"version reads up to {FORMAT_VERSION}); upgrade pyneuron to open it"
        )
    if found_kind != kind:
        raise StoreError(f"{path} holds {found_kind}, not {kind}")
    try:
        grid = Grid(**manifest["grid"])
        files = manifest["files"]
        n_masks, n_entries = int(manifest["n_masks"]), int(manifest["n_entries"])
    except (KeyError, TypeError, ValueError) as error:
        raise _corrupt(path, f"incomplete {MANIFEST_FILE} ({error})") from None

    expected_bytes = {
        "offsets.bin": 8 * (n_masks + 1),
        "images.bin": 4 * n_entries,
        "slots.bin": 8 * n_entries,
        "counts.bin": 4 * n_entries,
    }
    for name in [*INDEX_FILES, WORDS_FILE, TABLE_FILE]:
        file = path / name
        if name not in files or not file.is_file():
            raise _corrupt(path, f"{name} is missing")
        size = file.stat().st_size
        if size != files[name]["bytes"] or size != expected_bytes.get(name, size):
            raise _corrupt(
                path, f"{name} has {size} bytes, expected {files[name]['bytes']} (truncated?)"
            )
    words_bytes = files[WORDS_FILE]["bytes"]
    if words_bytes % (8 * grid.words_per_image):
        raise _corrupt(path, f"{WORDS_FILE} does not hold whole images")
    if verify is None:
        verify = words_bytes <= AUTO_VERIFY_BYTES
    checked = [*INDEX_FILES, TABLE_FILE] + ([WORDS_FILE] if verify else [])
    for name in checked:
        if crc32_of_file(path / name) != files[name]["crc32"]:
            raise _corrupt(path, f"checksum of {name} does not match")

    index = [np.fromfile(path / name, dtype=dtype) for name, dtype in INDEX_FILES.items()]
    if words_bytes:
        words = np.memmap(path / WORDS_FILE, dtype="<u8", mode="r")
    else:
        words = np.zeros(0, dtype="<u8")
    try:
        table = pd.read_parquet(path / TABLE_FILE)
    except Exception as error:  # pyarrow raises several types for damaged files
        raise _corrupt(path, f"unreadable {TABLE_FILE} ({error})") from None
    if len(table) != n_masks:
        raise _corrupt(path, f"{TABLE_FILE} has {len(table)} rows for {n_masks} masks")
    return {
        "grid": grid,
        "index": index,
        "words": words.astype(np.uint64, copy=False).reshape(-1, grid.words_per_image),
        "table": table,
        "metadata": manifest.get("metadata", {}),
        "verified": verify,
    }
