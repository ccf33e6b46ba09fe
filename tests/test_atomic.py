"""Atomic replacement of outputs: never a missing or half-written directory, recovery
after a kill, cleanup of leftovers (see pyneuron/atomic.py; scripts/kill_writes.py kills
real writers hundreds of times)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import pyneuron
from pyneuron.engine import atomic


def store(value: int) -> pyneuron.ConceptStore:
    masks = np.zeros((1, 2, 3, 3), dtype=bool)
    masks[0, 0, : value % 3 + 1] = True
    store = pyneuron.ConceptStore.from_masks(masks, [f"v{value}"])
    return store


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftover(path, kind: str, pid: int, host: str = atomic._HOST):
    sibling = path.parent / f".{path.name}.{kind}-{host}-{pid}-abc123"
    sibling.mkdir()
    return sibling


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_in_one_step_and_leaves_nothing_behind(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    path = tmp_path / "s"
    store(0).save(path)
    store(1).save(path, overwrite=True)
    assert pyneuron.ConceptStore.open(path).names == ["v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from_a").touch()
    if not atomic._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["from_a"]
    assert not any((tmp_path / "a").iterdir())


def test_kill_between_the_two_renames_is_recovered_on_open(tmp_path):
    # The state a SIGKILL leaves when the exchange is unavailable: the old store moved
    # aside, the new one not yet in place. Opening puts the old one back.
    path = tmp_path / "s"
    store(3).save(path)
    backup = leftover(path, "old", dead_pid())
    os.rename(path, backup / "previous")
    staging = leftover(path, "tmp", dead_pid())
    assert pyneuron.ConceptStore.open(path).names == ["v3"]
    assert not backup.exists() and not staging.exists()


def test_leftovers_of_dead_writers_are_removed_others_kept(tmp_path):
    path = tmp_path / "s"
    dead = leftover(path, "tmp", dead_pid())
    mine = leftover(path, "tmp", os.getpid())
    other_host = leftover(path, "tmp", dead_pid(), host="elsewhere.example")
    unrelated = tmp_path / ".t.tmp-x"
    unrelated.mkdir()
    store(0).save(path)
    assert not dead.exists()
    assert mine.exists() and other_host.exists() and unrelated.exists()
    assert pyneuron.ConceptStore.open(path).names == ["v0"]


def test_refused_overwrite_keeps_the_old_output(tmp_path):
    path = tmp_path / "s"
    store(0).save(path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        store(1).save(path)
    assert pyneuron.ConceptStore.open(path).names == ["v0"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


WRITER = """
import sys, numpy as np, pyneuron
path = sys.argv[1]
i = 0
print("ready", flush=True)
while True:
    masks = np.zeros((1, 40, 16, 16), dtype=bool)
    masks[0, :, : i % 16] = True
    with pyneuron.ConceptStore.writer((40, 16, 16), [f"v{i}"], path=path, overwrite=True) as w:
        for image in range(40):
            w.add_image(image, masks={f"v{i}": masks[0, image]})
    i += 1
"""


def test_sigkilled_writers_never_lose_the_store(tmp_path):
    path = tmp_path / "s"
    store(0).save(path)
    rng = np.random.default_rng(0)
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True
        )
        while (line := child.stdout.readline()) and line.strip() != "ready":
            pass  # an editable install may print its rebuild first
        assert line.strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 0.4)))
        child.send_signal(signal.SIGKILL)
        child.wait()
        opened = pyneuron.ConceptStore.open(path)  # recovers if need be
        assert len(opened) == 1 and opened.names[0].startswith("v")
        opened.verify()
    store(9).save(path, overwrite=True)  # cleans what the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


# -- single files: write_atomically --------------------------------------------------------


def test_write_atomically_writes_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "table.bin"
    path.write_bytes(b"old")
    data = bytes(range(256)) * 4096
    atomic.write_atomically(path, lambda p: p.write_bytes(data))
    assert path.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["table.bin"]
    atomic.write_atomically(tmp_path / "new.txt", lambda p: p.write_text("fresh"), durable=False)
    assert (tmp_path / "new.txt").read_text() == "fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "table.bin"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_write_atomically_keeps_the_old_content_when_the_write_fails(tmp_path, error):
    path = tmp_path / "summary.json"
    path.write_text("old")

    def write(temporary):
        assert temporary.parent == tmp_path and ".json.tmp-" in temporary.name
        with open(temporary, "w") as handle:
            handle.write("half of the new cont")
            handle.flush()
            raise error

    with pytest.raises(type(error)):
        atomic.write_atomically(path, write)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    with pytest.raises(type(error)):
        atomic.write_atomically(tmp_path / "absent.json", write)
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_write_atomically_into_a_missing_folder_is_a_clear_error(tmp_path):
    path = tmp_path / "missing" / "results.csv"
    with pytest.raises(FileNotFoundError, match=r"cannot write results\.csv: its folder does not"):
        atomic.write_atomically(path, lambda p: p.write_text("x"))
    assert not (tmp_path / "missing").exists()


def test_write_atomically_gives_the_permissions_of_a_plain_write(tmp_path):
    (tmp_path / "plain").write_text("x")
    atomic.write_atomically(tmp_path / "atomic", lambda p: p.write_text("x"))
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_killed_file_write_leaves_a_temporary_that_recover_removes(tmp_path):
    path = tmp_path / "results.parquet"
    path.write_text("old")
    names = []

    def write(temporary):
        names.append(temporary.name)
        temporary.write_text("partial")

    atomic.write_atomically(path, write)
    leftover = tmp_path / names[0].replace(f"-{os.getpid()}-", f"-{dead_pid()}-")
    leftover.write_text("partial")  # what a SIGKILL during `write` leaves
    atomic.recover(path)
    assert [p.name for p in tmp_path.iterdir()] == ["results.parquet"]
