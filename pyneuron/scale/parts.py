"""Expensive stages cut into parts (contiguous image ranges) and run on Ray.

A stage that maps images to a result (segmenting them into concept masks, capturing a
layer's activations) is run per *part*, a range ``[start, stop)`` of the images, by
:func:`run_parts`:

- on Ray, as a Ray Data ``map_batches`` over the missing parts with a pool of actors
  (one part per call, ``num_gpus`` per actor when the cluster has GPUs, the pool growing
  when nodes join); each actor receives the stage's function once, so what the function
  builds on its first call (a model) serves every part the actor runs;
- with ``backend="local"``, one part after the other in this process (the same files).

Every part writes its output into its own directory under ``parts_dir``, atomically (a
hidden staging directory renamed into place once complete), with a ``part.json`` naming
its image range and the run's key. ``parts_dir`` must be on a filesystem every node sees
(NFS, a cluster filesystem; on one machine any folder): workers write the parts there and
the driver reads them.

Parts already there are reused when they load: the size and CRC-32 of every file of the
part (recorded in ``part.json`` when it was written) and then the stage's own ``load``
(shapes, dtypes) are checked, so a rerun after a killed driver computes only the missing
parts, and a part that fails to load for any reason is computed again. A worker
process that dies mid-part is replaced and its part run again (Ray Data restarts its
actors and retries their calls, without limit: a part that kills its worker every time,
say out of memory, keeps being retried, as Ray's logs then show); a part that fails on
bad input fails the run with the worker's own exception.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import shutil
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from ..engine import storage
from ..engine.atomic import OutputKind, commit_directory, temporary_sibling
from ..engine.checks import positive_int
from ..errors import PyneuronError
from ..progress import progress_bar
from .ray import RayBackend, resolve_backend

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The file every finished part directory holds: its image range and the run's key.
PART_FILE = "part.json"
# Bump when what run_parts writes beside a stage's files changes (old parts are redone).
PART_FORMAT = 1
_PART_KIND = OutputKind("pyneuron part", lambda path: (path / PART_FILE).is_file())


@dataclass(frozen=True)
class Part:
    """One part of a stage: images ``[start, stop)``, written to the directory ``path``."""

    index: int
    start: int
    stop: int
    path: Path

    @property
    def n_images(self) -> int:
        """Images of the part."""
        return self.stop - self.start


def image_ranges(n_images: int, part_images: int) -> list[tuple[int, int]]:
    """The consecutive ranges ``[start, stop)`` of at most ``part_images`` images that
    cover ``n_images`` images.

    Examples
    --------
    >>> image_ranges(7, 3)
    [(0, 3), (3, 6), (6, 7)]
    """
    n_images = positive_int(n_images, "n_images")
    part_images = positive_int(part_images, "part_images")
    return [(a, min(a + part_images, n_images)) for a in range(0, n_images, part_images)]


def plan_parts(
    n_images: int, part_images: int, parts_dir: str | os.PathLike[str], key: str
) -> list[Part]:
    """The parts of a stage over ``n_images`` images, in ``parts_dir/<key>/``.

    ``key`` names the stage's inputs and settings (e.g. a :func:`pyneuron.scale.ray.digest`
    of them): parts of other inputs are never taken for these.
    """
    folder = Path(parts_dir) / key
    return [
        Part(k, a, b, folder / f"part-{a:09d}-{b:09d}")
        for k, (a, b) in enumerate(image_ranges(n_images, part_images))
    ]


def fingerprint_of(value: Any) -> str:
    """What names ``value`` (a model factory, a segmenter, a transform) in a stage's key:
    its ``fingerprint`` attribute when it has one (pyneuron's segmenters do; give one
    to yours, changed whenever its outputs change); a string or path as it is; a
    ``functools.partial`` or a mapping by its parts; a function or class by its qualified
    name; another object by its ``repr`` (its type's name when that shows only an
    address).

    Examples
    --------
    >>> import functools
    >>> fingerprint_of("CIDAS/clipseg-rd64-refined")
    'CIDAS/clipseg-rd64-refined'
    >>> fingerprint_of(functools.partial(image_ranges, part_images=4))
    "pyneuron.scale.parts.image_ranges() {'part_images': 4}"
    """
    given = getattr(value, "fingerprint", None)
    if isinstance(given, str) and given:
        return given
    if value is None or isinstance(value, (str, os.PathLike, int, float)):
        return str(value)
    if isinstance(value, functools.partial):
        return f"{fingerprint_of(value.func)}{value.args!r} {value.keywords!r}"
    if isinstance(value, Mapping):
        return repr(sorted((str(k), fingerprint_of(v)) for k, v in value.items()))
    if hasattr(value, "__qualname__"):
        return f"{value.__module__}.{value.__qualname__}"
    text = repr(value)
    if " at 0x" in text:
        return f"{type(value).__module__}.{type(value).__qualname__}"
    return text


def file_stamps(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, size, modification time) of each input file, for a stage's key: parts of
    files changed since are computed again.

    Raises
    ------
    PyneuronError
        A file that cannot be read, named.
    """
    stamps = []
    for path in files:
        try:
            stat = path.stat()
        except OSError as error:
            raise PyneuronError(f"image file {path} cannot be read: {error.strerror}") from None
        stamps.append((str(path), stat.st_size, stat.st_mtime_ns))
    return stamps


def _part_record(part: Part) -> dict[str, Any]:
    """What a part's :data:`PART_FILE` says besides its files."""
    return {
        "format": PART_FORMAT,
        "start": part.start,
        "stop": part.stop,
        "key": part.path.parent.name,
    }


def _files(folder: Path) -> dict[str, dict[str, int]]:
    """Size and CRC-32 of every file under ``folder``, by relative path."""
    return {
        path.relative_to(folder).as_posix(): {
            "bytes": path.stat().st_size,
            "crc32": storage.crc32_of_file(path),
        }
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != PART_FILE
    }


def compute_part(compute: Callable[[int, int, Path], Any], part: Part) -> None:
    """Run ``compute(start, stop, staging)`` for one part, then record the size and
    CRC-32 of every file it wrote in :data:`PART_FILE` and move the staging directory to
    ``part.path`` atomically; on any failure nothing appears at ``part.path``."""
    staging = temporary_sibling(part.path)
    try:
        compute(part.start, part.stop, staging)
        record = {**_part_record(part), "files": _files(staging)}
        (staging / PART_FILE).write_text(json.dumps(record))
        commit_directory(staging, part.path, True, _PART_KIND)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_part(part: Part, load: Callable[[Part], T]) -> T:
    """A finished part, or an exception: its :data:`PART_FILE` must name this part and
    every file must have the size and CRC-32 recorded there (one read of the part);
    then ``load(part)``, which checks the contents (shapes, dtypes)."""
    record = json.loads((part.path / PART_FILE).read_text())
    files = record.pop("files")
    if record != _part_record(part):
        raise PyneuronError(f"{part.path / PART_FILE} names another part: {record}")
    found = _files(part.path)
    for name, expected in files.items():
        if found.get(name) != expected:
            raise PyneuronError(f"{part.path / name} is missing or damaged (size or CRC-32)")
    return load(part)


def _discard(path: Path) -> None:
    """Remove what a part that failed to load left at ``path``."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


class PartWorker:
    """The Ray Data actor class of :func:`run_parts`: runs parts of one stage.

    Holds the stage's function for the actor's life (what it caches serves every part
    the actor runs). A part that raises is reported in the ``error`` column (the pickled
    exception), not raised, so the driver raises the worker's own exception with its
    message.
    """

    def __init__(self, compute: Callable[[int, int, Path], Any]) -> None:
        self.compute = compute

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        node = ray.util.get_node_ip_address()
        errors, seconds = [], []
        for index, start, stop, path in zip(
            batch["index"], batch["start"], batch["stop"], batch["path"]
        ):
            began = time.perf_counter()
            part = Part(int(index), int(start), int(stop), Path(str(path)))
            try:
                compute_part(self.compute, part)
                errors.append(b"")
            except Exception as error:  # reported to the driver, which raises it
                errors.append(_pickled_error(error, node))
            seconds.append(time.perf_counter() - began)
        n = len(errors)
        return {
            "index": np.asarray(batch["index"]),
            "node": np.array([node] * n, dtype=object),
            "seconds": np.array(seconds, dtype=np.float64),
            "error": np.array(errors, dtype=object),
        }


def _pickled_error(error: Exception, node: str) -> bytes:
    text = "".join(traceback.format_exception(error))
    try:
        return pickle.dumps((error, node, text))
    except Exception:  # an exception that does not pickle: its text
        return pickle.dumps((PyneuronError(f"{type(error).__name__}: {error}"), node, text))


def _raise_worker_error(data: bytes, part: Part) -> None:
    error, node, text = pickle.loads(data)
    logger.error(
        "part %d (images %d-%d) failed on node %s:\n%s",
        part.index,
        part.start,
        part.stop,
        node,
        text,
    )
    raise error


@dataclass
class PartRun(Generic[T]):
    """What :func:`run_parts` returns: each part's loaded result, in image order, and how
    the run went.

    Attributes
    ----------
    results
        ``load(part)`` of every part.
    parts
        The parts.
    reused
        Indices of the parts found done (not computed).
    seconds
        Per computed part index: seconds its worker spent on it (computing and writing).
    nodes
        Per computed part index: the address of the node that computed it.
    """

    results: list[T]
    parts: list[Part]
    reused: list[int]
    seconds: dict[int, float]
    nodes: dict[int, str]


def run_parts(
    compute: Callable[[int, int, Path], Any],
    load: Callable[[Part], T],
    parts: Sequence[Part],
    backend: RayBackend | str | None = "ray",
    *,
    gpus_per_part: float | None = None,
    progress: bool = True,
    desc: str = "parts",
) -> PartRun[T]:
    """Run a stage over its parts, reusing the parts already done.

    Parameters
    ----------
    compute
        ``compute(start, stop, directory)`` writes the output of images ``[start, stop)``
        into ``directory`` (fresh and empty; moved into place once ``compute`` returns).
        With Ray it must pickle (cloudpickle) and run on every node; it is sent once
        per actor, so it may cache what it builds (a model) on its first call.
    load
        ``load(part)`` reads a finished part from ``part.path`` on the driver and raises
        on anything wrong (missing or damaged files, other shapes or dtypes): the part is
        then computed again.
    parts
        From :func:`plan_parts`.
    backend
        ``"ray"`` or a :class:`~pyneuron.scale.ray.RayBackend` (its ``address``, and
        ``cpus_per_task`` CPUs per actor), or ``"local"``: every part in this process,
        one after the other.
    gpus_per_part
        GPUs per actor; by default 1 when the cluster has GPUs, else 0.
    progress
        Show a progress bar.
    desc
        The progress bar's label.

    Returns
    -------
    PartRun
        The loaded parts in image order, and which were reused.

    Raises
    ------
    PyneuronError
        The cluster cannot be reached (said before any work), a part fails (the worker's
        own exception is raised), or a part just computed cannot be loaded by the driver
        (``parts_dir`` not shared by the nodes).

    Examples
    --------
    >>> import tempfile
    >>> import numpy as np
    >>> def compute(start, stop, folder):
    ...     np.save(folder / "squares.npy", np.arange(start, stop) ** 2)
    >>> def load(part):
    ...     return np.load(part.path / "squares.npy")
    >>> parts = plan_parts(5, 2, tempfile.mkdtemp(), key="squares")
    >>> run = run_parts(compute, load, parts, "local", progress=False)
    >>> np.concatenate(run.results).tolist(), run.reused
    ([0, 1, 4, 9, 16], [])
    >>> run_parts(compute, load, parts, "local", progress=False).reused
    [0, 1, 2]
    """
    backend = resolve_backend(backend)
    parts = list(parts)
    ray = backend.connect() if backend is not None else None  # before any expensive work
    results: list[Any] = [None] * len(parts)
    missing = []
    for part in parts:
        try:
            results[part.index] = load_part(part, load)
        except Exception as error:  # a damaged part can fail in any way
            if os.path.lexists(part.path):
                logger.warning("part %s does not load (%s); computing it again", part.path, error)
                _discard(part.path)
            missing.append(part)
    todo = {p.index for p in missing}
    reused = [p.index for p in parts if p.index not in todo]
    logger.info("%d of %d parts already done; computing %d", len(reused), len(parts), len(missing))
    run = PartRun(results, parts, reused, {}, {})
    with progress_bar(
        total=len(parts), initial=len(reused), desc=desc, unit="part", enabled=progress
    ) as bar:
        if ray is None:
            for part in missing:
                began = time.perf_counter()
                compute_part(compute, part)
                run.seconds[part.index] = time.perf_counter() - began
                run.nodes[part.index] = "local"
                results[part.index] = load_part(part, load)
                bar.update(1)
        elif missing:
            for index, node, seconds in _on_ray(ray, backend, compute, missing, gpus_per_part):
                part = parts[index]
                run.seconds[index], run.nodes[index] = seconds, node
                try:
                    results[index] = load_part(part, load)
                except Exception as error:
                    raise PyneuronError(
                        f"part {index} (images {part.start}-{part.stop}) was written by node "
                        f"{node} but does not load here ({error}); parts_dir must be a "
                        "folder every node sees (a shared filesystem)"
                    ) from None
                bar.update(1)
    return run


def _on_ray(
    ray: Any,
    backend: RayBackend,
    compute: Callable[[int, int, Path], Any],
    missing: list[Part],
    gpus_per_part: float | None,
) -> Any:
    """Run the parts ``missing`` as a Ray Data ``map_batches`` with an actor pool;
    yields ``(part index, node, seconds)`` as parts finish (raising a part's error)."""
    resources = ray.cluster_resources()
    if gpus_per_part is None:
        gpus_per_part = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    if gpus_per_part < 0:
        raise PyneuronError(f"gpus_per_part must be >= 0, got {gpus_per_part!r}")
    fit = int(resources.get("CPU", 0) // backend.cpus_per_task)
    if gpus_per_part > 0:
        fit = min(fit, int(resources.get("GPU", 0) // gpus_per_part))
    actors = max(1, min(fit, len(missing)))
    data = ray.data.from_items(
        [{"index": p.index, "start": p.start, "stop": p.stop, "path": str(p.path)} for p in missing]
    )
    data.context.enable_progress_bars = False
    data.context.print_on_execution_start = False
    mapped = data.map_batches(
        PartWorker,
        fn_constructor_args=(compute,),
        batch_size=1,
        # Two parts per actor in flight (the pool then grows onto nodes that join), but
        # one when there are few parts: else the first actor up takes two parts while
        # the others are still starting, and runs them one after the other.
        compute=ray.data.ActorPoolStrategy(
            min_size=actors,
            max_size=len(missing),
            max_tasks_in_flight_per_actor=1 if len(missing) <= 2 * actors else 2,
        ),
        num_cpus=backend.cpus_per_task,
        num_gpus=gpus_per_part,
    )
    by_index = {p.index: p for p in missing}
    for row in mapped.iter_rows():
        index = int(row["index"])
        if row["error"]:
            _raise_worker_error(row["error"], by_index[index])
        yield index, str(row["node"]), float(row["seconds"])
