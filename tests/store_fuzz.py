"""Fuzzing of the store loader: damaged and edited copies of saved stores, and the check
that each one is either refused with a StoreError or opens and gives exactly the results
a numpy oracle computes from its decoded masks.

Used by tests/test_store_fuzz.py (a few hundred variants, fixed seed) and by
scripts/fuzz_store.py (thousands, in child processes that may crash or hang).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from oracle import brute_force_beam, iou, random_case

import pyneuron
from pyneuron.engine import storage

INDEX = dict(storage.INDEX_FILES)
DATA_FILES = [*INDEX, storage.WORDS_FILE, storage.TABLE_FILE]
GRIDS = [(6, 8, 8), (5, 5, 7), (4, 9, 13), (3, 1, 1)]

# Values a manifest field is set to; "RAW_BIG" is written as the JSON number 1e400.
ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 1.5, "1", "", "x", [], [1, 2], {}, 10**30, 2**64,
    "RAW_BIG", {"bytes": 5}, {"bytes": 1, "crc32": -1},
]  # fmt: skip


def make_bases(root: Path, seed: int = 0) -> list[tuple[Path, np.ndarray]]:
    """Saved concept stores on several grids, with the units the oracle scores."""
    rng = np.random.default_rng(seed)
    bases = []
    for k, (n, h, w) in enumerate(GRIDS):
        concepts, units = random_case(rng, n, h, w, n_concepts=6, n_units=4)
        path = root / f"base{k}"
        pyneuron.ConceptStore.from_masks(concepts, [f"c{i}" for i in range(6)]).save(path)
        bases.append((path, units))
    return bases


def read_manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / storage.MANIFEST_FILE).read_text())


def write_manifest(path: Path, manifest: dict[str, Any], checksum: bool = True) -> None:
    """Write a manifest, with a matching manifest checksum if ``checksum``."""

    def text() -> str:
        return json.dumps(manifest).replace('"RAW_BIG"', "1e400")

    if checksum:  # of the manifest as the loader will parse it
        manifest["manifest_crc32"] = storage.manifest_crc32(json.loads(text()))
    (path / storage.MANIFEST_FILE).write_text(text())


def refresh(path: Path, name: str, checksum: bool = True) -> None:
    """Record ``name``'s current size and CRC-32 in the manifest (an edit made to look
    intact)."""
    manifest = read_manifest(path)
    file = path / name
    manifest["files"][name] = {"bytes": file.stat().st_size, "crc32": storage.crc32_of_file(file)}
    write_manifest(path, manifest, checksum)


def _flip(path: Path, name: str, rng: np.random.Generator) -> str:
    data = bytearray((path / name).read_bytes())
    if not data:
        return f"{name} empty"
    at = int(rng.integers(len(data)))
    data[at] ^= 1 << int(rng.integers(8))
    (path / name).write_bytes(bytes(data))
    return f"flip {name}@{at}"


def _resize(path: Path, name: str, rng: np.random.Generator) -> str:
    data = (path / name).read_bytes()
    size = int(rng.integers(0, len(data) + 17))
    (path / name).write_bytes(data[:size] + bytes(max(0, size - len(data))))
    return f"resize {name} {len(data)}->{size}"


def _edit_array(path: Path, rng: np.random.Generator) -> str:
    name = str(rng.choice(list(INDEX)))
    array = np.fromfile(path / name, dtype=INDEX[name])
    if not array.size:
        return f"{name} empty"
    manifest = read_manifest(path)
    grid = manifest["grid"]
    pixels = grid["height"] * grid["width"]
    at = int(rng.integers(array.size))
    value = int(array[at])
    choices = [0, -1, 1, value + 1, value - 1, pixels, pixels - 1, pixels + 1]
    choices += [grid["n_images"], manifest["n_entries"], 2**31 - 1, -(2**31), 10**9]
    info = np.iinfo(array.dtype)
    array[at] = min(max(int(rng.choice(choices)), info.min), info.max)
    array.tofile(path / name)
    refresh(path, name)
    return f"set {name}[{at}] {value}->{array[at]}"


def _edit_words_consistently(path: Path, rng: np.random.Generator) -> str:
    """Flip one bitset bit and fix its entry's count (and maybe the table): a store that
    may be valid but different, which must then give results matching its masks."""
    manifest = read_manifest(path)
    grid = manifest["grid"]
    pixels = grid["height"] * grid["width"]
    wpi = (pixels + 63) // 64
    words = np.fromfile(path / storage.WORDS_FILE, dtype="<u8").reshape(-1, wpi)
    if not words.size:
        return "no bitsets"
    slots = np.fromfile(path / "slots.bin", dtype="<i8")
    counts = np.fromfile(path / "counts.bin", dtype="<i4")
    slot = int(rng.integers(words.shape[0]))
    bit = int(rng.integers(wpi * 64 if rng.random() < 0.2 else pixels))  # maybe padding
    before = int(words[slot, bit // 64] >> np.uint64(bit % 64)) & 1
    words[slot, bit // 64] ^= np.uint64(1) << np.uint64(bit % 64)
    words.tofile(path / storage.WORDS_FILE)
    entry = np.flatnonzero(slots == slot)
    if entry.size and rng.random() < 0.8:
        counts[entry[0]] += -1 if before else 1
        counts.tofile(path / "counts.bin")
        refresh(path, "counts.bin")
        if rng.random() < 0.5:
            offsets = np.fromfile(path / "offsets.bin", dtype="<i8")
            table = pd.read_parquet(path / storage.TABLE_FILE)
            mask = int(np.searchsorted(offsets, entry[0], side="right") - 1)
            table.loc[mask, "pixels"] += -1 if before else 1
            table.to_parquet(path / storage.TABLE_FILE, index=False)
            refresh(path, storage.TABLE_FILE)
    refresh(path, storage.WORDS_FILE)
    return f"words slot {slot} bit {bit}"


def _edit_manifest(path: Path, rng: np.random.Generator) -> str:
    manifest = read_manifest(path)
    fields = [(f,) for f in ("format", "version", "kind", "grid", "n_masks", "n_entries")]
    fields += [("files",), ("metadata",), ("manifest_crc32",)]
    fields += [("grid", f) for f in ("n_images", "height", "width")]
    fields += [("files", n) for n in DATA_FILES]
    fields += [("files", n, k) for n in DATA_FILES for k in ("bytes", "crc32")]
    *parents, key = fields[int(rng.integers(len(fields)))]
    field = ".".join([*parents, key])
    target = manifest
    for part in parents:
        target = target[part]
    roll = rng.random()
    if roll < 0.2:
        target.pop(key, None)
        what = f"delete {field}"
    elif roll < 0.3:
        nested: Any = 0
        for _ in range(int(rng.choice([50, 5000, 50000]))):
            nested = [nested]
        target[key] = nested
        what = f"deep {field}"
    elif roll < 0.5 and isinstance(target.get(key), int) and not isinstance(target[key], bool):
        target[key] += int(rng.choice([-1, 1, 64, -64]))
        what = f"nudge {field}"
    else:
        target[key] = ODD_VALUES[int(rng.integers(len(ODD_VALUES)))]
        what = f"set {field}={target[key]!r:.20}"
    checksum = rng.random() < 0.8
    try:
        write_manifest(path, manifest, checksum)
    except RecursionError:  # too deep for json.dumps: write the text by hand
        (path / storage.MANIFEST_FILE).write_text('{"metadata": ' + "[" * 50000 + "]" * 50000 + "}")
    return what + ("" if checksum else " (stale manifest checksum)")


def _edit_table(path: Path, rng: np.random.Generator) -> str:
    table = pd.read_parquet(path / storage.TABLE_FILE)
    roll = int(rng.integers(6))
    if roll == 0:
        table = table.iloc[:-1]
    elif roll == 1:
        table.loc[0, "name"] = None
    elif roll == 2:
        table.loc[0, "name"] = table.loc[len(table) - 1, "name"]
    elif roll == 3:
        table.loc[int(rng.integers(len(table))), "pixels"] += 1
    elif roll == 4:
        table = table.drop(columns=str(rng.choice(list(table.columns))))
    else:
        table["name"] = np.arange(len(table))
    table.to_parquet(path / storage.TABLE_FILE, index=False)
    refresh(path, storage.TABLE_FILE)
    return f"table edit {roll}"


def _remove(path: Path, rng: np.random.Generator) -> str:
    name = str(rng.choice([*DATA_FILES, storage.MANIFEST_FILE]))
    (path / name).unlink()
    if rng.random() < 0.5:
        (path / name).mkdir()
    return f"remove {name}"


def mutate(path: Path, rng: np.random.Generator) -> str:
    """Damage or edit the store at ``path`` in one to three random ways; describe them."""
    done: list[str] = []
    for _ in range(int(rng.choice([1, 1, 1, 2, 3]))):
        try:
            _mutate_once(path, rng, done)
        except Exception:  # noqa: BLE001 - an earlier edit broke what this one reads
            break
        if not (path / storage.MANIFEST_FILE).is_file():
            break
    return "; ".join(done)


def _mutate_once(path: Path, rng: np.random.Generator, done: list[str]) -> None:
    roll = rng.random()
    name = str(rng.choice(DATA_FILES))
    if roll < 0.15:
        done.append(_flip(path, name, rng))
    elif roll < 0.3:
        done.append(_flip(path, name, rng))
        refresh(path, name)
    elif roll < 0.38:
        done.append(_resize(path, name, rng))
        if rng.random() < 0.5:
            refresh(path, name)
    elif roll < 0.55:
        done.append(_edit_array(path, rng))
    elif roll < 0.7:
        done.append(_edit_words_consistently(path, rng))
    elif roll < 0.85:
        done.append(_edit_manifest(path, rng))
    elif roll < 0.95:
        done.append(_edit_table(path, rng))
    else:
        done.append(_remove(path, rng))


def check(path: Path, units: np.ndarray, verify: bool | None) -> str:
    """Open ``path``; return "refused" (a StoreError) or "opened" after checking that
    counts, the IoU table and a length-2 search match the oracle on its decoded masks.
    Anything else raises AssertionError (a non-pyneuron exception propagates)."""
    try:
        store = pyneuron.ConceptStore.open(path, verify=verify)
    except pyneuron.StoreError:
        return "refused"
    dense = np.stack([store.mask(i) for i in range(len(store))])
    flat = dense.reshape(len(store), -1)
    assert store.pixel_counts.tolist() == flat.sum(1).tolist(), "pixel counts disagree"
    assert store.image_counts.tolist() == dense.any((2, 3)).sum(1).tolist()
    assert store.table()["pixels"].tolist() == flat.sum(1).tolist()
    unit_masks = pyneuron.UnitMasks.from_masks(units)
    if store.grid != unit_masks.grid:  # a consistent edit of the grid: a different store
        try:
            pyneuron.iou_table(unit_masks, store, progress=False)
        except pyneuron.GridMismatchError:
            return "opened"
        raise AssertionError("units on another grid were accepted")
    if not store.pixel_counts.any():
        return "opened"
    table = pyneuron.iou_table(unit_masks, store, progress=False)
    expected = [[iou(flat[c], u.reshape(-1)) for c in range(len(store))] for u in units]
    np.testing.assert_allclose(table, expected, rtol=1e-12, err_msg="IoU table disagrees")
    found = pyneuron.explain(unit_masks, store, length=2, beam_size=3, progress=False)
    for u, unit in enumerate(units):
        beam = brute_force_beam(unit, dense, store.names, length=2, beam_size=3)
        if beam:
            assert found.loc[u, "formula"] == beam[0][0], f"unit {u}: search disagrees"
            assert found.loc[u, "score"] == beam[0][1]
    return "opened"


def check_variant(root: Path, bases: list[tuple[Path, np.ndarray]], seed: int, i: int) -> str:
    """Make variant ``i`` of ``seed`` (reproducible alone) under ``root`` and check it.

    Returns "refused", "opened" or "unverified by request" (bitsets damaged and opened
    with ``verify=False``, which trusts them by design; :meth:`verify` must then find the
    damage), or a line starting with "WRONG" (a wrong result) or "ERROR" (an exception
    that is not a StoreError)."""
    rng = np.random.default_rng((seed, i))
    base, units = bases[int(rng.integers(len(bases)))]
    variant = root / f"variant{i}"
    shutil.rmtree(variant, ignore_errors=True)
    shutil.copytree(base, variant)
    what = mutate(variant, rng)
    verify = [None, True, False][int(rng.integers(3))]
    where = f"variant {i} ({what}, verify={verify})"
    try:
        outcome = check(variant, units, verify)
    except AssertionError as error:
        outcome = f"WRONG {where}: {error}"
        if verify is False and ("words" in what or storage.WORDS_FILE in what):
            try:
                pyneuron.ConceptStore.open(variant, verify=False).verify()
            except pyneuron.PyneuronError:
                outcome = "unverified by request"
    except Exception as error:  # noqa: BLE001 - reported, not hidden
        outcome = f"ERROR {where}: {type(error).__name__}: {str(error)[:300]}"
    shutil.rmtree(variant)
    return outcome


def run_variants(root: Path, seed: int, count: int, start: int = 0) -> dict[str, int]:
    """Check variants ``start .. start + count`` of ``seed``; raise on the first wrong
    result or foreign exception, else return the counts of outcomes."""
    bases = make_bases(root / "bases", seed)
    outcomes: dict[str, int] = {}
    for i in range(start, start + count):
        outcome = check_variant(root, bases, seed, i)
        if outcome.startswith(("WRONG", "ERROR")):
            raise AssertionError(outcome)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes
