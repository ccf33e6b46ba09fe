"""Explaining units across machines on Ray, with results identical to one machine.

The search is embarrassingly parallel over units: the work is cut into *shards*, blocks
of consecutive units of one layer (one set of unit masks), run as Ray tasks and
scheduled dynamically (a free worker takes the next shard, so units that take long do
not hold the others up). Each worker runs the same C++ beam search as
:func:`pyneuron.explain` on its block; the driver turns the raw results into rows with
the same code as a local run and concatenates them in unit order, so the table is
identical (same formulas, same float64 scores) to ``backend="local"``.

The data reach the workers this way:

- the concept store is opened by each worker from its directory when it was opened
  from disk (:meth:`ConceptStore.open`, memory-mapped; the worker checks that the
  manifest is the driver's and verifies every checksum; kept open across calls), or
  else put once in Ray's object store;
- each shard carries only its own block of unit masks (through the object store), so
  every node receives the units it explains and no others. Shards are submitted a few
  per worker ahead, so the driver holds only those blocks at a time.

Faults: a worker process that dies mid-shard is replaced and its shard rerun (Ray task
retries, ``max_retries``); a shard that fails on bad input fails the run with the
worker's exception and message. With ``shard_dir``, every finished shard is written
there atomically (named by a fingerprint of the inputs and search settings), so
rerunning an interrupted run computes only the missing shards.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine import set_num_threads, storage
from ..engine.atomic import write_atomically
from ..engine.masks import MaskSet
from ..engine.search import SearchResult, raw_beam_search, result_table, unit_chunks
from ..engine.store import ConceptStore
from ..engine.units import UnitMasks
from ..errors import PyneuronError, StoreError
from ..progress import progress_bar

logger = logging.getLogger(__name__)

#: ``backend=`` values of :func:`pyneuron.explain` besides a :class:`RayBackend`.
BACKENDS = ("local", "ray")
SHARE_MODES = ("auto", "path", "object")
# Bump when the layout of a shard file changes (old shards are then not reused).
# 2: every array of SearchResult.FIELDS (1: a subset of them).
SHARD_FORMAT = 2


@dataclass(frozen=True)
class RayBackend:
    """Settings of a run on Ray, and the search backend given to ``explain`` /
    ``dissect`` (``backend="ray"`` uses the defaults).

    Parameters
    ----------
    address
        The cluster: ``None`` uses the Ray session already started in this process, or
        else ``ray.init()`` (a cluster started with ``ray start`` on this machine, or a
        new local one); ``"auto"`` a running cluster (an error when there is none);
        ``"local"`` a new single-machine instance; anything else is passed to
        ``ray.init(address=...)`` (``"HOST:PORT"``, ``"ray://HOST:PORT"``).
    unit_block
        Units per shard. Smaller blocks balance better, larger ones cost less overhead.
    shard_dir
        Directory where finished shards are kept (atomic writes); a rerun with the
        same inputs and settings reuses them and computes only the missing shards.
    share_store
        ``"path"``: workers open the store from ``store.path`` (a directory every node
        sees); ``"object"``: the store is put once in Ray's object store; ``"auto"``:
        the path when the store was opened from disk, else the object store.
    cpus_per_task
        CPUs Ray reserves per shard, and the engine threads each shard uses.
    max_retries
        Reruns of a shard whose worker process died (not of bad-input failures).

    Examples
    --------
    >>> import pyneuron
    >>> backend = pyneuron.RayBackend(address="auto", unit_block=16, shard_dir="run.shards")
    >>> backend.unit_block
    16
    """

    address: str | None = None
    unit_block: int = 32
    shard_dir: str | os.PathLike[str] | None = None
    share_store: str = "auto"
    cpus_per_task: int = 1
    max_retries: int = 3

    def __post_init__(self) -> None:
        for name in ("unit_block", "cpus_per_task"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PyneuronError(f"RayBackend.{name} must be an integer >= 1, got {value!r}")
        retries = self.max_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise PyneuronError(f"RayBackend.max_retries must be an integer >= 0, got {retries!r}")
        if self.share_store not in SHARE_MODES:
            raise PyneuronError(
                f"RayBackend.share_store must be one of {', '.join(SHARE_MODES)}, "
                f"got {self.share_store!r}"
            )

    def connect(self) -> Any:
        """The ``ray`` module, connected to this backend's cluster (an ``address`` that
        accepts no connection is refused within :data:`CONNECT_TIMEOUT` seconds, before
        Ray is imported); already connected, the session as it is.

        Raises
        ------
        PyneuronError
            Ray is not installed, or the cluster cannot be reached.
        """
        return _connect(self.address)

    def explain_units(
        self,
        units: Any,
        store: ConceptStore,
        *,
        search: tuple[int, int, Sequence[int], float],
        full_beam: bool,
        progress: bool,
    ) -> pd.DataFrame:
        """The search of :func:`pyneuron.engine.search.explain` on this cluster (its
        :class:`~pyneuron.engine.search.SearchBackend` method)."""
        return explain_on_ray(
            units, store, self, search=search, full_beam=full_beam, progress=progress
        )


def resolve_backend(backend: Any) -> Any:
    """The backend object for ``backend``: None for ``"local"`` (this process), a
    :class:`RayBackend` with the default settings for ``"ray"``; other strings are
    refused; None and backend objects are passed on as they are, for the engine to
    check."""
    if isinstance(backend, str):
        if backend not in BACKENDS:
            raise PyneuronError(
                f"unknown backend {backend!r}; use 'local', 'ray' or a pyneuron.RayBackend(...)"
            )
        return RayBackend() if backend == "ray" else None
    return backend


def run_shard_dir(out: str | os.PathLike[str]) -> Path:
    """Where the commands keep the finished shards of the run written to ``out``:
    ``OUT.shards`` next to it (the run directory itself appears only when complete).

    Examples
    --------
    >>> run_shard_dir("runs/resnet").name
    'resnet.shards'
    """
    out = Path(out)
    return out.with_name(f"{out.name}.shards")


# -- fingerprints --------------------------------------------------------------------------


def digest(*parts: Any) -> str:
    """A hex digest of strings, bytes and numpy arrays (anything else by its ``str``):
    the fingerprint naming shards and parts by their inputs.

    Examples
    --------
    >>> import numpy as np
    >>> digest("a", np.arange(3)) == digest("a", np.arange(3)), len(digest("a"))
    (True, 32)
    >>> digest(np.zeros((0, 4))) != digest(np.zeros((4, 0)))
    True
    """
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype.str}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).reshape(-1).view(np.uint8))
        else:
            h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def _content_key(masks: MaskSet) -> str:
    """Fingerprint of a mask set's containers (and of a store's concept names)."""
    names = "\n".join(masks.names) if isinstance(masks, ConceptStore) else ""
    return digest(masks.KIND, masks.grid.shape, names, *masks.arrays)


def _manifest_key(path: Path) -> str:
    try:
        return digest("manifest", (path / storage.MANIFEST_FILE).read_bytes())
    except OSError as error:
        raise StoreError(f"cannot read the store manifest at {path}: {error}") from None


# -- what the workers receive --------------------------------------------------------------


@dataclass(frozen=True)
class _Shared:
    """The concept store as a worker gets it: a directory (``key`` names its manifest),
    or an object-store reference put by the ``explain`` call named in ``key`` (wrapped in
    a list so that Ray does not fetch it before the worker's cache is asked)."""

    key: str
    path: str | None = None
    ref: list | None = None


def _store_arrays(store: ConceptStore) -> dict[str, Any]:
    return {
        "grid": store.grid,
        "index": tuple(store.arrays[:4]),
        "words": store.arrays.words,
        "names": store.names,
        "categories": store.categories,
    }


def _unit_block(units: UnitMasks, start: int, stop: int) -> dict[str, Any]:
    """The containers of units [start, stop) alone, as arrays of a new mask set."""
    block = units.block(start, stop)
    return {"grid": units.grid, "index": tuple(block[:4]), "words": block.words}


def _share_store(ray: Any, store: ConceptStore, mode: str, call: str) -> _Shared:
    path = getattr(store, "path", None)
    if mode == "path" and path is None:
        raise PyneuronError(
            "share_store='path' needs a store opened from a directory (ConceptStore.open); "
            "save it where every node sees it, or use share_store='object'"
        )
    if path is not None and mode in ("auto", "path"):
        return _Shared(_manifest_key(Path(path)), path=str(Path(path).resolve()))
    return _Shared(f"{call}:store", ref=[ray.put(_store_arrays(store))])


# Per worker process: the stores already opened, by key, most recent last. Stores
# opened from a path stay across calls; one that came through the object store is
# dropped when a shard of another call arrives (so old objects are not pinned in memory).
_CACHE: dict[str, ConceptStore] = {}
_CACHE_SIZE = 4


def _open_store(ray: Any, shared: _Shared) -> ConceptStore:
    if shared.ref is not None:
        call = shared.key.split(":")[0]
        for key in [k for k in _CACHE if ":" in k and not k.startswith(call + ":")]:
            del _CACHE[key]
    cached = _CACHE.pop(shared.key, None)
    if cached is None:
        cached = _open_uncached(ray, shared)
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    _CACHE[shared.key] = cached
    return cached


def _open_uncached(ray: Any, shared: _Shared) -> ConceptStore:
    if shared.path is not None:
        path = Path(shared.path)
        node = ray.util.get_node_ip_address()
        hint = (
            "the store must be on a path every node sees; otherwise pass "
            "RayBackend(share_store='object')"
        )
        try:
            if _manifest_key(path) != shared.key:
                raise StoreError(f"the store at {path} is not the one the driver opened")
            return ConceptStore.open(path, verify=True)
        except StoreError as error:
            raise StoreError(f"worker on node {node}: {error}; {hint}") from None
    data = ray.get(shared.ref[0])
    return ConceptStore(
        data["grid"], data["index"], data["words"], data["names"], data["categories"]
    )


def _run_shard(store: _Shared, block: dict[str, Any], search: tuple, threads: int) -> SearchResult:
    """A Ray task: the engine's raw beam-search result for a block of units."""
    import ray

    concepts = _open_store(ray, store)  # kept, and so is its co-occurrence table
    units = UnitMasks(block["grid"], *block["index"], block["words"])
    set_num_threads(threads)
    return raw_beam_search(units, concepts, search)


# -- shard files ---------------------------------------------------------------------------


def _shard_file(directory: Path, start: int, stop: int) -> Path:
    return directory / f"units-{start:09d}-{stop:09d}.npz"


def _write_shard(path: Path, raw: SearchResult) -> None:
    """Write a shard atomically: a temporary file in the same directory, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)

    def save(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, **raw.to_arrays())

    write_atomically(path, save)


def _read_shard(path: Path, n_units: int, search: tuple) -> SearchResult | None:
    """A finished shard, or ``None`` when it is missing, unreadable or not the shape this
    search gives (then it is computed again): any failure to load counts, never only the
    expected ones."""
    if not path.is_file():
        return None
    length, beam_size = int(search[0]), int(search[1])
    try:
        with np.load(path, allow_pickle=False) as data:
            raw = SearchResult.from_arrays(data)
        shapes_ok = (
            len(raw) == n_units
            and raw.score.shape == (n_units, beam_size)
            and raw.concepts.shape == (n_units, beam_size, length)
        )
    except Exception as error:  # a damaged file can fail in any way
        logger.warning("shard %s is unreadable (%s); computing it again", path, error)
        return None
    if not shapes_ok:
        logger.warning("shard %s is not a shard of this search; computing it again", path)
        return None
    return raw


# -- the driver ----------------------------------------------------------------------------


#: Seconds between counts of the cluster's workers while no shard finishes.
WINDOW_REFRESH = 10.0
#: Seconds to wait for a cluster's address to accept a connection before giving up.
CONNECT_TIMEOUT = 20.0


def _check_reachable(address: str | None) -> None:
    """Refuse at once, with a clear message, a ``HOST:PORT`` (or ``ray://HOST:PORT``)
    address that accepts no connection within :data:`CONNECT_TIMEOUT` seconds: Ray itself
    would keep retrying for minutes."""
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection(
            (host.strip("[]") or "127.0.0.1", int(port)), CONNECT_TIMEOUT
        ):
            pass
    except OSError as error:
        raise PyneuronError(
            f"cannot reach the Ray cluster at {address!r} ({error}); start one with "
            "`ray start --head` or pass its address (or 'local' for this machine only)"
        ) from None


def _connect(address: str | None) -> Any:
    _check_reachable(address)  # before importing Ray, which reads its settings then
    try:
        import ray
    except ImportError:
        raise PyneuronError(
            "backend='ray' needs Ray; install it with pip install 'pyneuron[ray]'"
        ) from None
    if ray.is_initialized():
        return ray
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as error:
        raise PyneuronError(
            f"cannot connect to a Ray cluster at {address!r} ({error}); start one with "
            "`ray start --head` or pass its address (or 'local' for this machine only)"
        ) from None
    return ray


@dataclass(frozen=True)
class _Shard:
    chunk: int
    start: int
    stop: int
    file: Path | None


def explain_on_ray(
    units: Any,
    store: ConceptStore,
    backend: RayBackend,
    *,
    search: tuple[int, int, Sequence[int], float],
    full_beam: bool,
    progress: bool,
) -> pd.DataFrame:
    """The Ray backend of :func:`pyneuron.explain` (inputs already checked there).

    ``search`` is ``(length, beam_size, operator codes, penalty)``.
    """
    chunks = [chunk for _, chunk in unit_chunks(units, store)]
    length, beam_size, ops, penalty = search
    search_args = (int(length), int(beam_size), list(ops), float(penalty))

    # Shards are named by the contents of the inputs, not by how they reach the workers.
    store_key = _content_key(store) if backend.shard_dir is not None else ""
    shards: list[_Shard] = []
    for index, chunk in enumerate(chunks):
        directory = None
        if backend.shard_dir is not None:
            units_key = _content_key(chunk)
            run_key = digest(SHARD_FORMAT, store_key, units_key, search_args, backend.unit_block)
            directory = Path(backend.shard_dir) / run_key
        for start in range(0, len(chunk), backend.unit_block):
            stop = min(start + backend.unit_block, len(chunk))
            file = _shard_file(directory, start, stop) if directory is not None else None
            shards.append(_Shard(index, start, stop, file))

    raws: list[SearchResult | None] = [
        _read_shard(s.file, s.stop - s.start, search_args) if s.file is not None else None
        for s in shards
    ]
    missing = [i for i, raw in enumerate(raws) if raw is None]
    if backend.shard_dir is not None:
        logger.info(
            "%d of %d shards already done in %s; computing %d",
            len(shards) - len(missing),
            len(shards),
            backend.shard_dir,
            len(missing),
        )
    if missing:
        _compute(backend, store, chunks, shards, raws, search_args, progress)
    # The shards cover units 0, 1, ... in order: one table from all their arrays (column
    # types are then inferred over all units, not per shard).
    whole = None
    if raws:
        whole = SearchResult.from_arrays(
            {
                key: np.concatenate([getattr(raw, key) for raw in raws])
                for key in SearchResult.FIELDS
            }
        )
    return result_table(whole, 0, store.names, full_beam)


def _compute(
    backend: RayBackend,
    store: ConceptStore,
    chunks: list[UnitMasks],
    shards: list[_Shard],
    raws: list[SearchResult | None],
    search_args: tuple,
    progress: bool,
) -> None:
    """Run the shards whose ``raws`` entry is None on Ray, filling ``raws`` (and the
    shard files) as they finish."""
    missing = iter([i for i, raw in enumerate(raws) if raw is None])
    ray = backend.connect()
    store_shared = _share_store(ray, store, backend.share_store, uuid.uuid4().hex)
    task = ray.remote(_run_shard).options(
        num_cpus=backend.cpus_per_task,
        max_retries=backend.max_retries,
        retry_exceptions=False,
    )
    pending: dict[Any, int] = {}

    def submit() -> None:
        # Two shards per worker in flight: every worker always has its next shard at
        # hand. The workers are counted again each time, so nodes that join get work.
        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1) // backend.cpus_per_task))
        for i in itertools.islice(missing, max(0, window - len(pending))):
            s = shards[i]
            block = _unit_block(chunks[s.chunk], s.start, s.stop)
            pending[task.remote(store_shared, block, search_args, backend.cpus_per_task)] = i

    done_units = sum(s.stop - s.start for s, raw in zip(shards, raws) if raw is not None)
    with progress_bar(
        total=sum(len(chunk) for chunk in chunks),
        initial=done_units,
        desc="explain (ray)",
        unit="unit",
        enabled=progress,
    ) as bar:
        try:
            submit()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=WINDOW_REFRESH)
                if not ready:  # nothing finished for a while: nodes may have joined
                    submit()
                    continue
                i = pending.pop(ready[0])
                raw = _get(ray, ready[0])
                if shards[i].file is not None:
                    _write_shard(shards[i].file, raw)
                raws[i] = raw
                bar.update(shards[i].stop - shards[i].start)
                submit()
        finally:
            for ref in pending:
                ray.cancel(ref)


def _get(ray: Any, ref: Any) -> SearchResult:
    """A shard's result; a failed shard raises the worker's own exception."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = error.cause
        if isinstance(cause, Exception):
            raise cause from None
        raise PyneuronError(f"a shard failed on a Ray worker: {error}") from None
