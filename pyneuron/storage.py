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
:mod:`pyneuron.atomic`), so an interrupted write never leaves a half-written store under
the final name, nor removes the store it replaces.

Opening checks every invariant that costs no pass over the bitsets: the manifest's
fields and checksum, file sizes, the CRC-32 of the index files and the table, the index
structure (offsets, image order, container kinds against their counts, every bitset
used once) and the table's per-mask totals. With ``verify`` (default for bitsets up to
256 MiB) it also checks the bitsets' CRC-32, popcounts and padding bits.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import _native
from .atomic import OutputKind, commit_directory, recover, refuse_existing, temporary_sibling
from .errors import PyneuronError, StoreError
from .grid import Grid

FORMAT_NAME = "pyneuron.maskset"
#: Version 2 checksums the manifest itself; version 1 stores (without) are still read.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
    """The :class:`~pyneuron.atomic.OutputKind` of stores of ``kind``: a directory whose
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


def _read_manifest(path: Path, kind: str) -> dict[str, Any]:
    """The manifest, every field checked, or a :class:`StoreError` saying what is wrong."""
    manifest_path = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_bytes())
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


def load(path: str | os.PathLike[str], *, kind: str, verify: bool | None) -> dict[str, Any]:
    """Read a store directory and check it (see the module docstring); the words are
    memory-mapped, not read, unless ``verify``."""
    path = Path(path)
    recover(path)
    if not path.is_dir():
        raise StoreError(f"no store at {path}: not a directory")
    if not (path / MANIFEST_FILE).is_file():
        raise StoreError(f"{path} is not a pyneuron store (no {MANIFEST_FILE})")
    manifest = _read_manifest(path, kind)
    grid: Grid = manifest["grid"]
    files = manifest["files"]
    n_masks, n_entries = manifest["n_masks"], manifest["n_entries"]

    expected_bytes = {
        "offsets.bin": 8 * (n_masks + 1),
        "images.bin": 4 * n_entries,
        "slots.bin": 8 * n_entries,
        "counts.bin": 4 * n_entries,
    }
    for name in [*INDEX_FILES, WORDS_FILE, TABLE_FILE]:
        file = path / name
        if not file.is_file():
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
    words = words.astype(np.uint64, copy=False).reshape(-1, grid.words_per_image)
    try:
        native = _native.NativeMaskSet(grid.n_images, grid.pixels, *index, words.reshape(-1))
        if verify:
            native.verify_words()
    except ValueError as error:
        raise _corrupt(path, str(error)) from None
    try:
        table = pd.read_parquet(path / TABLE_FILE)
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


def pixel_counts(offsets: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Set pixels per mask from the CSR offsets and per-entry counts."""
    n_masks = offsets.shape[0] - 1
    owner = np.repeat(np.arange(n_masks), np.diff(offsets))
    return np.bincount(owner, weights=counts, minlength=n_masks).astype(np.int64)
