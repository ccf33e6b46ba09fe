"""Atomic replacement of outputs: directories (stores, unit masks, runs, reports) and
single files (run tables, caches, shards, progress files, benchmark results).

A single file is written with :func:`write_atomically`: to a hidden temporary sibling,
flushed, then renamed over the target with :func:`os.replace` (one atomic step).

Everything pyneuron writes to a directory ``out`` is first written to a hidden sibling
``.<out>.tmp-<host>-<pid>-<random>`` and then moved into place:

- ``out`` absent: one ``rename`` (atomic).
- ``out`` present (``overwrite``, and only when ``out`` is empty or recognisably an
  earlier output of the same kind, see :class:`OutputKind`): on Linux the two
  directories are swapped with ``renameat2(RENAME_EXCHANGE)``, one atomic step, so
  ``out`` is never missing; the old contents, now in the sibling, are deleted
  afterwards. Where the exchange is not available, ``out`` is first renamed to
  ``.<out>.old-<host>-<pid>-<random>/previous`` and the new directory renamed in; a
  process killed between the two renames leaves no ``out``, and the next open, write or
  :func:`recover` of ``out`` moves the previous contents back.

A process killed while writing leaves its hidden sibling behind; those of processes that
no longer run on this host are deleted by the next write of the same ``out`` (and by
:func:`recover`). Siblings of running processes or of other hosts are never touched.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import OutputExistsError

_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _sibling_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(
        rf"^\.{re.escape(path.name)}\.(tmp|old)-{re.escape(_HOST)}-(\d+)-[A-Za-z0-9_]+$"
    )


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh hidden directory next to ``path`` (same filesystem, so renames are atomic),
    named after this host and process so leftovers of killed processes can be found."""
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{kind}-{_HOST}-{os.getpid()}-"
    return Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # e.g. PermissionError: it exists, under another user
        return False
    return False


def _dead_siblings(path: Path) -> list[tuple[str, Path]]:
    """(kind, sibling) for the hidden siblings of ``path`` whose writer process is gone."""
    pattern = _sibling_pattern(path)
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and _process_gone(int(match.group(2))):
            found.append((match.group(1), entry))
    return found


def recover(path: str | os.PathLike[str]) -> None:
    """Repair ``path`` after a killed write: bring back a directory replaced half-way
    (when ``path`` is missing) and delete leftovers of dead writers. Best effort: on a
    read-only location nothing changes."""
    path = Path(path)
    leftovers = _dead_siblings(path)
    if not os.path.lexists(path):
        backups = [s / "previous" for kind, s in leftovers if kind == "old"]
        backups = [b for b in backups if os.path.lexists(b)]
        if backups:
            newest = max(backups, key=lambda b: b.lstat().st_mtime_ns)
            try:
                os.rename(newest, path)
            except OSError:
                return
    for _, sibling in leftovers:
        _remove(sibling)


@dataclass(frozen=True)
class OutputKind:
    """What pyneuron writes to a directory, and how to recognise one already on disk.

    ``--overwrite`` / ``overwrite=True`` only ever replaces an empty directory or a
    directory that ``recognise`` accepts as an earlier output of the same kind, never
    someone's other files.
    """

    name: str
    recognise: Callable[[Path], bool]

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is a directory this kind recognises (False on any read error)."""
        try:
            return path.is_dir() and bool(self.recognise(path))
        except (OSError, ValueError):
            return False


def _is_working_directory(path: Path) -> bool:
    """Whether ``path`` is the current directory or one of its parents (it cannot be
    renamed while a process works inside it)."""
    try:
        here = Path.cwd().resolve()
        target = path.resolve()
    except OSError:
        return False
    return target == here or target in here.parents


def refuse_existing(
    path: Path, overwrite: bool, kind: OutputKind, option: str = "overwrite=True"
) -> None:
    """Raise unless ``path`` can take a new output of ``kind``.

    Free are: nothing at ``path``, an empty directory, and with ``overwrite`` a
    directory that holds an earlier output of the same ``kind``. Anything else (a file,
    a directory of other files, the current directory) is refused with
    :class:`~pyneuron.errors.OutputExistsError`, and nothing is deleted.
    """
    recover(path)
    if os.path.lexists(path) and _is_working_directory(path):
        raise OutputExistsError(
            f"cannot write the {kind.name} to {path}: it is the current directory (or holds "
            "it); give a new directory name, e.g. ./run1"
        )
    if not os.path.lexists(path) or (
        path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    ):
        return
    if not overwrite:
        raise OutputExistsError(f"{path} already exists; pass {option} to replace it")
    if not kind.holds(path):
        what = "a file" if not path.is_dir() else "a directory of other files"
        raise OutputExistsError(
            f"{path} is {what}, not a {kind.name}; {option} only replaces an earlier "
            f"{kind.name} or an empty directory, so nothing was changed. Choose another "
            "output path (or remove it yourself)"
        )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where not supported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a written file to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_atomically(
    path: str | os.PathLike[str], write: Callable[[Path], object], *, durable: bool = True
) -> None:
    """Write one file so that ``path`` always holds either its old content or the whole new one.

    ``write`` gets the path of a fresh, empty temporary file next to ``path`` (same
    folder, so the same filesystem) and writes the complete content there, by path
    (``DataFrame.to_parquet``, ``Path.write_text``, ``open(..., "wb")``, ...). The
    temporary is then flushed to disk, renamed over ``path`` with :func:`os.replace` and
    the folder flushed too. If anything fails, ``KeyboardInterrupt`` included, the
    temporary is removed, ``path`` keeps its old content (or stays absent) and the
    exception propagates.

    Parameters
    ----------
    path
        The file to write; its folder must exist.
    write
        Called once with the temporary's path; its return value is ignored.
    durable
        Flush the file and its folder to disk (``fsync``) before returning (the default).
        ``False`` keeps the atomic rename but skips the flushes, for caches whose entries
        are checked when read.

    Raises
    ------
    FileNotFoundError
        The folder of ``path`` does not exist; nothing is written.

    See Also
    --------
    commit_directory : the same for whole directories (stores, unit masks, runs, reports).

    Notes
    -----
    The temporary is named ``.<name>.tmp-<host>-<pid>-<random>``, like the staging
    directories, so one left behind by a killed process is removed by :func:`recover`.
    It is created with the permissions a plain ``open`` would give (umask applied).

    Examples
    --------
    >>> import json, tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_atomically(folder / "summary.json", lambda p: p.write_text(json.dumps([1, 2])))
    >>> (folder / "summary.json").read_text()
    '[1, 2]'
    >>> [p.name for p in folder.iterdir()]  # no temporary left behind
    ['summary.json']
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        os.close(os.open(temporary, flags, 0o666))
    except FileNotFoundError:
        if path.parent.is_dir():
            raise
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot write {path.name}: its folder does not exist (create it first)",
            str(path.parent),
        ) from None
    try:
        write(temporary)
        if durable:
            fsync_file(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def commit_directory(staging: Path, path: Path, overwrite: bool, kind: OutputKind) -> None:
    """Move a fully written staging directory to ``path`` atomically (see the module
    docstring); ``path`` is never left missing or half-written.

    An existing empty directory is replaced; an earlier output of the same ``kind``
    needs ``overwrite``; anything else is refused (:func:`refuse_existing`).
    """
    try:
        refuse_existing(path, overwrite, kind)
    except FileExistsError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not os.path.lexists(path):
        os.rename(staging, path)
    elif _exchange(staging, path):
        _remove(staging)  # now the old contents
    else:
        old = temporary_sibling(path, "old")
        os.rename(path, old / "previous")
        try:
            os.rename(staging, path)
        except BaseException:
            os.rename(old / "previous", path)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_directory(path.parent)


def commit_entries(staging: Path, out: Path, names: Sequence[str]) -> None:
    """Move the entries ``names`` of a fully written ``staging`` directory into ``out``
    (a directory that may hold other things, e.g. a report written into a folder of the
    user's), replacing older entries of those names; the last name goes last (a report's
    ``index.html``).

    If a move fails, the entries already moved are taken back and the older ones
    restored, so ``out`` holds either all the old entries or all the new ones.
    """
    old = Path(tempfile.mkdtemp(prefix=".entries.old-", dir=out))
    moved: list[str] = []
    try:
        for name in names:
            target = out / name
            if os.path.lexists(target):
                os.rename(target, old / name)
            moved.append(name)
            os.rename(staging / name, target)
    except BaseException:
        for name in reversed(moved):
            if os.path.lexists(out / name) and not os.path.lexists(staging / name):
                os.rename(out / name, staging / name)
            if os.path.lexists(old / name):
                os.rename(old / name, out / name)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
