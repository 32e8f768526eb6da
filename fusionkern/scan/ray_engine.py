"""The Ray engine: the region's tiles scored by actors placed on the nodes of a Ray cluster.

Connecting follows ``ray.init``: ``--address`` absent means ``RAY_ADDRESS``, else the cluster this machine belongs
to (the one ``ray start`` last started here), else a new local instance; ``auto``, ``HOST:PORT``, ``ray://HOST:PORT``
(Ray Client) and ``local`` (always a new instance) are passed on. Where the cluster uses token authentication, the
token in ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` is sent unless ``RAY_AUTH_MODE``
says otherwise; a refused connection is one error naming the address and those settings.

Before any tile, a small task on every node opens every input as an actor would (so the rasters must be readable
there: a shared file system, or GDAL paths such as ``/vsis3/...``) and reports the node's fusionkern version and
whether its torch was built with CUDA. Nodes that cannot take part are left out with a warning; the scan stops
with one error line when none can. Actors are then placed per node (:func:`plan_actors`): by default one per GPU
(scoring on that GPU), else one per :data:`CPU_SHARE` CPUs with torch's threads set to their share; ``--workers``
sets the total instead. Each actor decides its device itself, on its node.

The checkpoint travels once through the object store; exported artefacts (onnxruntime, TensorRT) are built on each
node into a cache of its own (:func:`node_cache`), once per node. An actor reads, cuts and scores one tile at a time
with the local engine's code and batches (:func:`fusionkern.scan.tiles.process_tile`), so the scores are the local
engine's. Finished tiles come back to the driver, which records them for ``--resume``.

Failures: a tile that fails on a node is retried on another; a node that failed :data:`NODE_FAILURES` tiles that
others then finished gets no more; an actor that dies (its node lost, its process killed) gives its tile back to the others and is
replaced once where its node lives on. A tile that failed :data:`TILE_FAILURES` times, or on every node there is,
stops the scan with one :class:`ClusterError` naming the tile, the node and the reason; the tiles finished by then
stay recorded for ``--resume``.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import logging
import math
import os
import re
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from fusionkern import __version__
from fusionkern.errors import ConfigError, FusionkernError, MissingDependencyError
from fusionkern.scan.backends import EXPORTED_SUFFIXES
from fusionkern.scan.engine import EngineOptions, EngineStats
from fusionkern.scan.grid import ChipLayout, ScanGrid
from fusionkern.scan.inputs import ScanInputs
from fusionkern.scan.tiles import StackReader, Tile, TileResult, process_tile

CPU_SHARE = 4
"""CPUs per CPU actor when the pool is sized from the cluster: a node of N CPUs gets N // 4 actors (at least one)."""
TILE_FAILURES = 3
"""Failures of one tile (errors or actors lost while scoring it) that stop the scan."""
NODE_FAILURES = 2
"""Tiles failed on one node, and finished on another, after which it gets no more."""
CONNECT_TIMEOUT_S = 10.0
"""How long the cluster's address may take to answer before the scan gives up on it."""
PROBE_TIMEOUT_S = 120.0
"""How long the nodes' input check may take; a node that has not answered by then is left out."""
START_TIMEOUT_S = 300.0
"""How long the scan waits for its first actor to be ready (the cluster may have no free CPU or GPU)."""
_POLL_S = 0.5
_NO_RESOURCES = "no CPU or GPU for Ray"
_GPU_BACKENDS = ("triton", "tensorrt")
_TILE_FIELDS = ("ti", "tj", "row0", "col0", "rows", "cols")
_log = logging.getLogger("fusionkern.scan.ray")


class ClusterError(FusionkernError):
    """A Ray cluster that cannot be reached, cannot run the scan, or failed to score a tile."""


def require_ray() -> Any:
    """The ``ray`` module, or the extra that provides it."""
    try:
        import ray
    except ImportError as exc:
        raise MissingDependencyError("ray", "ray", "The ray engine (--engine ray)") from exc
    return ray


@dataclass(frozen=True)
class RayJob:
    """What the actors need to score tiles.

    Attributes:
        inputs: The rasters (readable from every node).
        grid: The scan grid.
        layout: The chips.
        tile_chips: Chips per tile side.
        checkpoint: The checkpoint, or an exported model with its sidecar (read here, shipped once).
        checkpoint_sha256: Its SHA-256 (the key of the nodes' artefact caches).
        backend: Predictor backend.
        device: ``auto``, ``cpu`` or ``cuda``, decided by each actor on its node.
        preset: The preset the scan expects (None: any).
        options: Batch size and ``max_invalid``.
        workers: Actors in all (None: sized from the cluster's CPUs and GPUs).
        address: The cluster (None: ``RAY_ADDRESS``, else this machine's cluster, else a local instance).
    """

    inputs: ScanInputs
    grid: ScanGrid
    layout: ChipLayout
    tile_chips: int
    checkpoint: str
    checkpoint_sha256: str
    backend: str
    device: str = "auto"
    preset: str | None = None
    options: EngineOptions = field(default_factory=EngineOptions)
    workers: int | None = None
    address: str | None = None


@dataclass
class RayRun:
    """What a Ray scan did.

    Attributes:
        stats: Counts and timings (stage seconds summed over actors).
        backend: The backend and the devices its actors used, for ``scan.json``.
        cluster: The nodes, actors per node, their devices and tiles, retries and lost actors, for ``scan.json``.
    """

    stats: EngineStats
    backend: dict[str, Any]
    cluster: dict[str, Any] | None


def run_ray(job: RayJob, tiles: Sequence[Tile], on_tile: Callable[[TileResult], None] = lambda r: None) -> RayRun:
    """Scores ``tiles`` on a Ray cluster.

    Args:
        job: What to score and where.
        tiles: The tiles to do.
        on_tile: Called in this process with every finished tile.

    Returns:
        The stats, the backend's description and the cluster's.

    Raises:
        ConfigError: A ``--device`` the Ray engine cannot honour.
        ClusterError: No connection, no node that can read the inputs or run the actors, or a tile that failed
            on every node it was given to.
    """
    stats = EngineStats()
    if not tiles:
        return RayRun(stats, {"name": job.backend, "device": None}, None)
    gpu = _gpu_policy(job.backend, job.device)
    ray = require_ray()
    start = time.perf_counter()
    verbose = logging.getLogger("fusionkern").isEnabledFor(logging.INFO)  # fusionkern --verbose
    _quiet_ray(verbose)
    with _connection(ray, job.address, verbose) as address:
        nodes = _probe_nodes(ray, job)
        slots = plan_actors(nodes, job.workers, gpu)
        _refuse_empty(slots, nodes, gpu, job, address)
        pool = _Pool(ray, job, nodes, stats, on_tile)
        try:
            pool.run(slots, tiles)
        finally:
            pool.stop()
    stats.wall_s = time.perf_counter() - start
    devices = sorted({a["device"] for a in pool.described})
    return RayRun(stats, {"name": job.backend, "device": ", ".join(devices)}, pool.describe(address))


def node_cache(checkpoint_sha256: str) -> Path:
    """The folder of exported artefacts on the node this runs on (shared by its actors, kept between scans)."""
    user = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"fusionkern-{user}" / "cache" / checkpoint_sha256[:16]


# --------------------------------------------------------------------------------------------------------------
# Connecting
# --------------------------------------------------------------------------------------------------------------


def _quiet_ray(verbose: bool) -> None:
    """Ray's INFO lines (and its note that token authentication is on) only with --verbose."""
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray._private.authentication").setLevel(logging.INFO if verbose else logging.ERROR)


@contextlib.contextmanager
def _connection(ray: Any, address: str | None, verbose: bool) -> Iterator[str]:
    """Connects as ``ray.init(address)`` does (reusing a connection this process already has) and yields the
    cluster's address; disconnects at the end, stopping the instance where it was started here."""
    if ray.is_initialized():
        yield _cluster_address(ray)
        return
    asked = address or os.environ.get("RAY_ADDRESS") or None
    if asked and asked not in ("auto", "local"):
        # ray.init sends the token only to the cluster it finds itself; one given by address deserves it too.
        _send_token_if_any()
    level = logging.INFO if verbose else logging.WARNING
    try:
        _check_reachable(address, asked)
        ray.init(address=address or None, include_dashboard=False, log_to_driver=verbose, logging_level=level)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError, AuthenticationError...
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever the attempt left half set up
        raise ClusterError(_connect_error(asked, exc)) from None
    try:
        yield _cluster_address(ray)
    finally:
        ray.shutdown()


def _check_reachable(address: str | None, asked: str | None) -> None:
    """Fails at once where nothing answers at the cluster's address (Ray would retry for minutes).

    Raises:
        ConnectionError: Nothing listens there.
    """
    if (asked or "").startswith("ray://"):
        return  # Ray Client: its own connection, with its own timeout
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:  # another Ray: leave it to ray.init
        return
    target = canonicalize_bootstrap_address(address)  # None: a new local instance
    if target is None:
        return
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {target}: {exc.strerror or exc}") from None


def _send_token_if_any() -> None:
    """Token authentication on for this process where a token exists and ``RAY_AUTH_MODE`` is not set."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _cluster_address(ray: Any) -> str:
    context = ray.get_runtime_context()
    return str(getattr(context, "gcs_address", None) or "local")


def _connect_error(asked: str | None, exc: BaseException) -> str:
    where = f"the Ray cluster at {asked}" if asked else "the Ray cluster this machine belongs to"
    text = " ".join(str(e) for e in _chain(exc))
    if re.search(r"Unauthenticated|InvalidAuthToken|AuthenticationError|authentication token", text, re.I):
        mode = os.environ.get("RAY_AUTH_MODE")
        sent = "refused the token this machine sent" if mode == "token" else (
            f"asks for a token and this machine sent none (RAY_AUTH_MODE is {mode or 'unset'})")
        return (f"cannot connect to {where}: it {sent}; put the cluster's token in RAY_AUTH_TOKEN, a file named by "
                "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token")  # fmt: skip
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = "check --address or RAY_ADDRESS, and that the cluster runs (ray status)"
    if not asked:
        hint = "start it (ray start --head), pass --address, or pass --address local for a new local instance"
    return f"cannot connect to {where} ({first}): {hint}"


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _gpu_policy(backend: str, device: str) -> bool | None:
    """Whether the actors need a GPU (True), must not use one (False) or take one where a node has it (None).

    Raises:
        ConfigError: A device name the Ray engine cannot honour (``cuda:N`` names one GPU of one machine).
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(
            f"--device {device!r} with --engine ray: use auto (a GPU where a node has one), cpu or cuda; each "
            "actor is given its own GPU by Ray, so a GPU number means nothing there"
        )
    if backend == "onnxruntime":  # as on the local engine: onnxruntime runs on the CPU
        return False
    if device == "cuda" or (device == "auto" and backend in _GPU_BACKENDS):
        return True
    return False if device == "cpu" else None


# --------------------------------------------------------------------------------------------------------------
# The nodes and the actors' placement
# --------------------------------------------------------------------------------------------------------------


@dataclass
class NodeInfo:
    """One node of the cluster as the scan sees it.

    Attributes:
        node_id: Ray's node id.
        address: The node's IP address.
        name: Ray's node name (the address unless ``ray start --node-name`` set one).
        cpus: CPUs the node offers Ray.
        gpus: GPUs the node offers Ray.
        cuda: Whether torch there was built with CUDA.
        left_out: Why the node takes no part (None: it does).
        actors: Actors that became ready there.
        devices: Device of each of them.
        tiles: Tiles it finished.
        chips: Chips of those tiles.
        failures: Tiles that failed there and were then finished on another node.
        cache: The folder of exported artefacts there.
    """

    node_id: str
    address: str
    name: str
    cpus: float
    gpus: float
    cuda: bool = False
    left_out: str | None = None
    actors: int = 0
    devices: list[str] = field(default_factory=list)
    tiles: int = 0
    chips: int = 0
    failures: int = 0
    cache: str | None = None

    @property
    def label(self) -> str:
        """How messages name the node."""
        name = f"{self.name}, " if self.name and self.name != self.address else ""
        return f"node {self.address} ({name}id {self.node_id[:8]})"


@dataclass(frozen=True)
class ActorSlot:
    """One actor to start.

    Attributes:
        node_id: The node it is pinned to.
        gpu: Whether it holds a GPU (and scores on it).
        num_cpus: CPUs it asks Ray for.
        num_gpus: GPUs it asks Ray for.
        threads: torch (or onnxruntime) threads it uses.
    """

    node_id: str
    gpu: bool
    num_cpus: float
    num_gpus: float
    threads: int


def plan_actors(nodes: Sequence[NodeInfo], workers: int | None, gpu: bool | None) -> list[ActorSlot]:
    """The actors of a scan, per node, from what each node offers.

    A node takes GPU actors where ``gpu`` allows it and it has GPUs and a CUDA build of torch: one per GPU. Else
    it takes CPU actors: one per :data:`CPU_SHARE` CPUs (at least one), each with its share of the node's CPUs as
    threads. ``workers`` replaces those counts by a total spread over the nodes in proportion to them (actors on
    one node then share its CPUs or GPUs, in fractions where there are more actors than either).

    Args:
        nodes: The nodes; those with ``left_out`` set get none.
        workers: Actors in all (None: the counts above).
        gpu: True: GPU actors only; False: CPU actors only; None: GPU actors where a node can run them.

    Returns:
        The actors, grouped by node.
    """
    kinds: dict[str, bool] = {}
    capacity: dict[str, int] = {}
    for node in nodes:
        if node.left_out is not None:
            continue
        on_gpu = gpu is not False and node.gpus >= 1 and node.cuda
        if gpu and not on_gpu:
            continue
        count = int(node.gpus) if on_gpu else (max(1, int(node.cpus) // CPU_SHARE) if node.cpus > 0 else 0)
        if count:
            kinds[node.node_id], capacity[node.node_id] = on_gpu, count
    counts = dict(capacity) if workers is None else _spread(int(workers), capacity)
    slots = []
    for node in nodes:
        n = counts.get(node.node_id, 0)
        if n and kinds[node.node_id]:  # a GPU each where there are enough, and a CPU each for reading and cutting
            slots += [ActorSlot(node.node_id, True, _share(node.cpus, n, 1.0), _share(node.gpus, n, 1.0), 1)] * n
        elif n:
            slots += [ActorSlot(node.node_id, False, _share(node.cpus, n), 0.0, max(1, int(node.cpus // n)))] * n
    return slots


def _spread(total: int, capacity: dict[str, int]) -> dict[str, int]:
    """``total`` actors over the nodes in proportion to their capacity (the emptiest node first)."""
    counts = {node: 0 for node in capacity}
    for _ in range(total if capacity else 0):
        node = min(capacity, key=lambda k: ((counts[k] + 1) / capacity[k], -capacity[k]))
        counts[node] += 1
    return counts


def _share(amount: float, n: int, most: float = math.inf) -> float:
    """``amount / n`` (at most ``most``), rounded down to the 1e-4 steps in which Ray counts resources."""
    return min(most, math.floor(amount / n * 1e4) / 1e4)


def probe_node(inputs: dict[str, Any], grid: ScanGrid, layout: ChipLayout) -> dict[str, Any]:
    """Run on every node before any tile: opens every input as the actors will, and says what the node runs.

    Returns:
        ``{"error": why the inputs cannot be opened (None: they can), "version": fusionkern's, "cuda": whether
        torch was built with CUDA}``.
    """
    try:
        with StackReader(ScanInputs.from_dict(inputs), grid, layout):
            error = None
    except Exception as exc:  # reported by the driver, with the node's name
        error = _reason(exc)
    import torch

    return {"error": error, "version": __version__, "cuda": torch.version.cuda is not None}


def _probe_nodes(ray: Any, job: RayJob) -> list[NodeInfo]:
    """The live nodes with what they offer, each checked by :func:`probe_node`."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = []
    for entry in ray.nodes():
        if not entry.get("Alive"):
            continue
        resources = entry.get("Resources") or {}
        address = str(entry.get("NodeManagerAddress") or "?")
        nodes.append(NodeInfo(entry["NodeID"], address, str(entry.get("NodeName") or address),
                              float(resources.get("CPU", 0)), float(resources.get("GPU", 0))))  # fmt: skip
    probe = ray.remote(probe_node)
    refs = {}
    for node in nodes:
        if node.cpus <= 0 and node.gpus <= 0:
            node.left_out = _NO_RESOURCES
            continue
        strategy = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
        ref = probe.options(num_cpus=0, scheduling_strategy=strategy, max_retries=0)
        refs[ref.remote(job.inputs.to_dict(), job.grid, job.layout)] = node
    ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    for ref in late:
        refs[ref].left_out = f"did not answer the input check within {PROBE_TIMEOUT_S:.0f} s"
        ray.cancel(ref, force=True)
    for ref in ready:
        node = refs[ref]
        try:
            answer = ray.get(ref)
        except Exception as exc:  # the node died, or cannot import fusionkern
            node.left_out = f"cannot run the input check ({_reason(exc)})"
            continue
        node.cuda = bool(answer["cuda"])
        if answer["version"] != __version__:
            node.left_out = f"runs fusionkern {answer['version']}, this machine {__version__}"
        elif answer["error"]:
            node.left_out = f"cannot read the inputs: {answer['error']}"
    for node in nodes:
        if node.left_out and node.left_out != _NO_RESOURCES:
            _log.warning("%s is left out of the scan: it %s", node.label, node.left_out)
    return nodes


def _refuse_empty(slots: list[ActorSlot], nodes: list[NodeInfo], gpu: bool | None, job: RayJob, address: str) -> None:
    """One clear error where no node can take an actor."""
    if slots:
        return
    why = "; ".join(f"{n.label}: {_why_not(n, gpu)}" for n in nodes) or "it has no live node"
    blind = [n for n in nodes if n.left_out and n.left_out.startswith("cannot read the inputs")]
    if blind and all(n in blind or n.left_out == _NO_RESOURCES for n in nodes):
        raise ClusterError(f"no node of the Ray cluster at {address} can read the inputs ({why}); the rasters must "
                           "be at the same path on every node (a shared folder, or GDAL paths such as /vsis3/...)")
    need = f"--backend {job.backend}" if job.device == "auto" else f"--device {job.device}"
    what = f"{need} needs GPU actors" if gpu else "the scan needs actors"
    raise ClusterError(f"{what}, and no node of the Ray cluster at {address} can take one ({why})")


def _why_not(node: NodeInfo, gpu: bool | None) -> str:
    if node.left_out:
        return node.left_out
    if gpu and node.gpus < 1:
        return "no GPU"
    if gpu and not node.cuda:
        return f"{node.gpus:g} GPU(s) for Ray, but its torch is a build without CUDA"
    return "no CPU for Ray"


# --------------------------------------------------------------------------------------------------------------
# The actors
# --------------------------------------------------------------------------------------------------------------


class TileScorer:
    """A Ray actor: one model and one set of open rasters, scoring one tile per call.

    Errors are returned, not raised, so that the driver can say which node failed and why in one line.

    Args:
        spec: The scan's :func:`_actor_spec`.
        payload: The checkpoint's (or exported model's) bytes.
        sidecar: The exported model's sidecar bytes (None for a checkpoint).
        gpu: Whether Ray gave this actor a GPU.
        threads: torch / onnxruntime threads.
    """

    def __init__(self, spec: dict[str, Any], payload: bytes, sidecar: bytes | None, gpu: bool, threads: int):
        self.error: str | None = None
        self.info: dict[str, Any] = {}
        try:
            self._start(spec, payload, sidecar, gpu, threads)
        except Exception as exc:  # returned by ready()
            self.error = _reason(exc)

    def _start(self, spec: dict[str, Any], payload: bytes, sidecar: bytes | None, gpu: bool, threads: int) -> None:
        import torch

        from fusionkern.scan.backends import OnnxPredictor, load_scan_model, make_predictor
        from fusionkern.scan.feed import ChipFeed, uses_feed

        torch.set_num_threads(threads)
        device = _actor_device(spec["device"], spec["backend"], gpu)
        # Exported artefacts go to a folder of this node's, built once by whichever of its actors comes first.
        cache = node_cache(spec["sha256"]) if spec["backend"] in ("onnxruntime", "tensorrt") else None
        with tempfile.TemporaryDirectory(prefix="fusionkern-actor-") as folder:
            path = os.path.join(folder, spec["name"])
            Path(path).write_bytes(payload)
            if sidecar is not None:  # an exported model travels with its sidecar, which is checked against it
                Path(path + ".json").write_bytes(sidecar)
            model = load_scan_model(path, spec["preset"], spec["backend"])
            # Built while the file exists: an exported model is read by its runtime here.
            with _node_lock(cache) if cache else contextlib.nullcontext():
                if spec["backend"] == "onnxruntime":
                    self.predictor = OnnxPredictor(model, cache, threads=threads)
                else:
                    self.predictor = make_predictor(spec["backend"], model, device, cache, spec["batch_size"])
        self.reader = StackReader(ScanInputs.from_dict(spec["inputs"]), spec["grid"], spec["layout"])
        self.layout, self.batch_size, self.max_invalid = spec["layout"], spec["batch_size"], spec["max_invalid"]
        self.feed = ChipFeed(self.layout, self.predictor.feed_device) if uses_feed(self.predictor) else None
        described = self.predictor.describe()
        self.info = {"device": str(described.get("device", device)), "threads": threads, "gpu": gpu,
                     "cache": str(cache) if cache else None}  # fmt: skip

    def ready(self) -> dict[str, Any]:
        """``{"error": ...}`` where the actor could not start, else its device, threads and cache."""
        return {"error": self.error} if self.error else dict(self.info)

    def score(self, fields: tuple[int, ...]) -> dict[str, Any]:
        """One tile's scores, reasons and stage seconds, or ``{"error": ...}``."""
        tile = Tile(*fields)
        try:
            result = process_tile(self.reader, self.predictor, tile, self.layout, self.batch_size, self.max_invalid,
                                  self.feed)  # fmt: skip
        except Exception as exc:  # reported by the driver, with the tile and the node
            return {"error": _reason(exc)}
        return {"scores": result.scores, "reasons": result.reasons, "timings": result.timings}


def _actor_device(device: str, backend: str, gpu: bool) -> Any:
    """The actor's torch device, decided on its node: its GPU where Ray gave it one and torch sees it."""
    import torch

    if backend == "onnxruntime" or not gpu:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")  # Ray's CUDA_VISIBLE_DEVICES leaves it this actor's GPU alone
    if device == "auto" and backend not in _GPU_BACKENDS:
        return torch.device("cpu")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise ConfigError(f"Ray gave this actor a GPU (CUDA_VISIBLE_DEVICES={visible}), but torch {torch.__version__} "
                      "sees no CUDA device there")  # fmt: skip


@contextlib.contextmanager
def _node_lock(cache: Path) -> Iterator[None]:
    """Holds the node's cache lock, so that the actors of one node build an artefact once between them."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _reason(exc: BaseException) -> str:
    """An exception as one short line (fusionkern's own messages as they are)."""
    text = " ".join(str(exc).split())
    if not isinstance(exc, FusionkernError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _actor_spec(job: RayJob) -> dict[str, Any]:
    return {
        "inputs": job.inputs.to_dict(), "grid": job.grid, "layout": job.layout, "backend": job.backend,
        "device": job.device, "preset": job.preset, "name": os.path.basename(job.checkpoint),
        "sha256": job.checkpoint_sha256, "batch_size": job.options.batch_size, "max_invalid": job.options.max_invalid,
    }  # fmt: skip


def _shipped(ray: Any, checkpoint: str) -> tuple[Any, Any]:
    """The checkpoint's bytes, and an exported model's sidecar, put in the object store once."""
    payload = ray.put(Path(checkpoint).read_bytes())
    sidecar = Path(f"{checkpoint}.json")
    exported = Path(checkpoint).suffix.lower() in EXPORTED_SUFFIXES and sidecar.is_file()
    return payload, ray.put(sidecar.read_bytes()) if exported else None


# --------------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Actor:
    handle: Any
    slot: ActorSlot
    node: NodeInfo
    ready: bool = False
    tile: Tile | None = None  # the tile in flight


class _Pool:
    """The actors of one scan, the tiles handed to them and what came back."""

    def __init__(
        self, ray: Any, job: RayJob, nodes: list[NodeInfo], stats: EngineStats, on_tile: Callable[[TileResult], None]
    ):
        self.ray, self.job, self.stats, self.on_tile = ray, job, stats, on_tile
        self.nodes = {n.node_id: n for n in nodes}
        self.actors: list[_Actor] = []
        self.starting: dict[Any, _Actor] = {}  # ready() references of the actors not yet ready
        self.calls: dict[Any, _Actor] = {}  # score() references of the tiles in flight
        self.described: list[dict[str, Any]] = []
        # Per tile: where it failed, why, and whether the node is to blame (an error, not an actor lost).
        self.failed: dict[Tile, list[tuple[NodeInfo, str, bool]]] = collections.defaultdict(list)
        self.restarted: set[str] = set()
        self.retries = self.lost = 0
        self.last_loss = ""
        self.spec = _actor_spec(job)
        self.payload, self.sidecar = _shipped(ray, job.checkpoint)

    def run(self, slots: list[ActorSlot], tiles: Sequence[Tile]) -> None:
        """Starts the actors and scores every tile (raises :class:`ClusterError` on a tile that cannot be done)."""
        for slot in slots:
            self._start(slot)
        todo = collections.deque(tiles)
        since = time.monotonic()
        while todo or self.calls:
            self._dispatch(todo)
            waiting = [*self.calls, *self.starting]
            if not waiting:
                raise ClusterError(self._stuck(todo))
            done, _ = self.ray.wait(waiting, num_returns=1, timeout=_POLL_S)
            for ref in done:
                if ref in self.starting:
                    self._started(self.starting.pop(ref), ref)
                else:
                    self._finished(self.calls.pop(ref), ref, todo)
            if not self.described and time.monotonic() - since > START_TIMEOUT_S:
                raise ClusterError(f"no Ray actor started within {START_TIMEOUT_S:.0f} s: the cluster has no free "
                                   f"CPU or GPU for them ({self._asked(slots)})")  # fmt: skip

    def stop(self) -> None:
        """Ends every actor (the cluster's resources are free again)."""
        for actor in list(self.actors):
            self._drop(actor)
        self.calls = {}

    def describe(self, address: str) -> dict[str, Any]:
        """The cluster part of ``scan.json``."""
        nodes = [
            {"id": n.node_id, "address": n.address, "name": n.name, "cpus": n.cpus, "gpus": n.gpus,
             "actors": n.actors, "devices": sorted(set(n.devices)), "tiles": n.tiles, "chips": n.chips,
             "failed_tiles": n.failures, "cache": n.cache, "left_out": n.left_out}
            for n in self.nodes.values()
        ]  # fmt: skip
        return {"address": address, "nodes": nodes, "actors": len(self.described), "retries": self.retries,
                "actors_lost": self.lost}  # fmt: skip

    # -- actors ------------------------------------------------------------------------------------------------

    def _start(self, slot: ActorSlot) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        handle = self.ray.remote(TileScorer).options(
            num_cpus=slot.num_cpus, num_gpus=slot.num_gpus, max_restarts=0, max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(slot.node_id, soft=False),
        ).remote(self.spec, self.payload, self.sidecar, slot.gpu, slot.threads)  # fmt: skip
        actor = _Actor(handle, slot, self.nodes[slot.node_id])
        self.actors.append(actor)
        self.starting[handle.ready.remote()] = actor

    def _started(self, actor: _Actor, ref: Any) -> None:
        try:
            info = self.ray.get(ref)
        except Exception as exc:  # the actor or its node died before it was ready
            self._lose(actor, exc)
            return
        if info.get("error"):
            self._drop(actor)
            self.last_loss = f"{actor.node.label}: {info['error']}"
            _log.warning("an actor on %s could not start: %s", actor.node.label, info["error"])
            return
        actor.ready = True
        actor.node.actors += 1
        actor.node.devices.append(info["device"])
        actor.node.cache = info["cache"]
        self.described.append(info)

    def _lose(self, actor: _Actor, exc: BaseException) -> str:
        """An actor died: a replacement starts once where its node lives on. Returns why it died."""
        self._drop(actor)
        self.lost += 1
        alive = any(n.get("NodeID") == actor.node.node_id and n.get("Alive") for n in self.ray.nodes())
        why = f"its process died ({_reason(exc)[:200]})" if alive else "its node died"
        self.last_loss = f"{actor.node.label}: {why}"
        _log.warning("lost an actor on %s: %s", actor.node.label, why)
        if not alive:
            actor.node.left_out = actor.node.left_out or "died during the scan"
        elif actor.node.node_id not in self.restarted and actor.node.left_out is None:
            self.restarted.add(actor.node.node_id)
            self._start(actor.slot)
        return why

    def _drop(self, actor: _Actor) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(actor.handle, no_restart=True)
        self.actors.remove(actor)
        for ref in [r for r, a in self.starting.items() if a is actor]:
            del self.starting[ref]

    # -- tiles -------------------------------------------------------------------------------------------------

    def _dispatch(self, todo: collections.deque[Tile]) -> None:
        """Gives every idle ready actor a tile that has not failed on its node."""
        for actor in self.actors:
            if not todo:
                return
            if not actor.ready or actor.tile is not None or actor.node.left_out is not None:
                continue
            tile = next((t for t in todo if not self._failed_on(t, actor.node)), None)
            if tile is not None:
                todo.remove(tile)
                actor.tile = tile
                self.calls[actor.handle.score.remote(tuple(getattr(tile, f) for f in _TILE_FIELDS))] = actor

    def _failed_on(self, tile: Tile, node: NodeInfo) -> bool:
        return any(n is node and blame for n, _, blame in self.failed.get(tile, ()))

    def _finished(self, actor: _Actor, ref: Any, todo: collections.deque[Tile]) -> None:
        tile, actor.tile = actor.tile, None
        assert tile is not None
        try:
            answer = self.ray.get(ref)
        except Exception as exc:  # the actor died with the tile: another one does it
            self._failed(tile, actor.node, self._lose(actor, exc), todo, node_fault=False)
            return
        if actor.node.left_out is not None:  # a node that gets no more tiles: its actors go once idle
            self._drop(actor)
        if "error" in answer:
            self._failed(tile, actor.node, answer["error"], todo, node_fault=True)
            return
        # Copied out of the object store, so that its memory is freed with the reference.
        result = TileResult(tile, np.array(answer["scores"]), np.array(answer["reasons"]), dict(answer["timings"]))
        for node, reason, blame in self.failed.pop(tile, ()):
            if blame:  # the tile could be done: the node where it failed is at fault
                self._blame(node, reason)
        actor.node.tiles += 1
        actor.node.chips += tile.n_chips
        self.stats.add(result)
        self.on_tile(result)

    def _failed(
        self, tile: Tile, node: NodeInfo, reason: str, todo: collections.deque[Tile], node_fault: bool
    ) -> None:
        """A tile that failed on ``node``: retried (on another node after an error), or the scan stops with it."""
        self.failed[tile].append((node, reason, node_fault))
        others = {a.node.node_id for a in self.actors if a.node.left_out is None and not self._failed_on(tile, a.node)}
        if len(self.failed[tile]) >= TILE_FAILURES or (node_fault and not others):
            where = ", ".join(dict.fromkeys(n.label for n, _, _ in self.failed[tile]))
            raise ClusterError(f"tile {tile.key} (chip rows {tile.row0}-{tile.row0 + tile.rows - 1}, columns "
                               f"{tile.col0}-{tile.col0 + tile.cols - 1}) failed on {where}: {reason}")  # fmt: skip
        self.retries += 1
        todo.appendleft(tile)
        if node_fault:
            _log.warning("tile %s failed on %s, retried elsewhere: %s", tile.key, node.label, reason)

    def _blame(self, node: NodeInfo, reason: str) -> None:
        """A node failed a tile that another then finished; after :data:`NODE_FAILURES` of them it gets no more."""
        node.failures += 1
        if node.failures >= NODE_FAILURES and node.left_out is None:
            node.left_out = f"failed {node.failures} tiles that other nodes could do (last: {reason})"
            _log.warning("%s gets no more tiles: it %s", node.label, node.left_out)
            for idle in [a for a in self.actors if a.node is node and a.tile is None]:
                self._drop(idle)  # those still scoring are dropped when their tile is back

    def _stuck(self, todo: collections.deque[Tile]) -> str:
        """Why tiles are left with nothing to wait for."""
        for tile in todo:
            if self.failed.get(tile) and self.actors:
                node, reason, _ = self.failed[tile][-1]
                return f"tile {tile.key} failed on {node.label} and no other node is left to try it: {reason}"
        return f"every Ray actor of the scan was lost, {len(todo)} tile(s) left undone (last: {self.last_loss})"

    def _asked(self, slots: list[ActorSlot]) -> str:
        per_node: dict[str, list[ActorSlot]] = collections.defaultdict(list)
        for slot in slots:
            per_node[slot.node_id].append(slot)
        return "; ".join(f"{self.nodes[k].label}: {len(s)} actor(s) of {s[0].num_cpus:g} CPU and {s[0].num_gpus:g} GPU"
                         for k, s in per_node.items())  # fmt: skip


__all__ = ["CPU_SHARE", "ClusterError", "NodeInfo", "RayJob", "RayRun", "plan_actors", "require_ray", "run_ray"]
