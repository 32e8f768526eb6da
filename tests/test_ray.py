"""The Ray engine on a real Ray cluster of this machine: nodes started with ``ray start`` by the tests, as users
start them, each stopped by its own process id.

The cluster (a head and a second node offering a GPU to Ray, one CPU each) lives for the module; tests add the
nodes they need (one that dies mid-scan, one that cannot see the rasters: a node in a mount namespace of its own
with an empty folder over them) and a cluster with token authentication. Every scan is checked against the local
engine. The placement rules (:func:`plan_actors`) are checked without Ray. Every test is bounded by an alarm and
every Ray process goes at the end, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import fusionkern.cli
from fusionkern.errors import ConfigError
from fusionkern.scan import ray_engine
from fusionkern.scan.ray_engine import CPU_SHARE, NodeInfo, _connect_error, _gpu_policy, plan_actors
from fusionkern.scan.resume import TILES_DIR
from test_scan import checkpoint, scan, write_region  # noqa: F401 - checkpoint is the same module fixture

RAY_REASON = "the Ray engine needs ray (pip install 'fusionkern[ray]')"
COMMON = dict(tile_px=53, batch_size=16, threshold=0.45, quicklook=False, checksums=False)  # 2 x 2 chips a tile
TEST_LIMIT_S = 300  # no test may take longer, whatever Ray does


# --------------------------------------------------------------------------------------------------------------
# Placement, without Ray
# --------------------------------------------------------------------------------------------------------------


def node(name: str, cpus: float, gpus: float = 0, cuda: bool = False, left_out: str | None = None) -> NodeInfo:
    return NodeInfo(name, "10.0.0.1", name, cpus, gpus, cuda, left_out)


def per_node(slots) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for s in slots:
        out.setdefault(s.node_id, []).append((s.gpu, s.num_cpus, s.num_gpus, s.threads))
    return out


def test_actors_are_sized_from_each_nodes_cpus_and_gpus():
    nodes = [node("big", 16), node("small", 2), node("gpu", 8, gpus=2, cuda=True), node("cpu-torch", 4, 1),
             node("blind", 32, left_out="cannot read the inputs")]  # fmt: skip
    slots = per_node(plan_actors(nodes, None, None))
    assert slots["big"] == [(False, 16 / 4, 0.0, 4)] * (16 // CPU_SHARE)  # a CPU share of threads each
    assert slots["small"] == [(False, 2.0, 0.0, 2)]  # at least one actor, with all the node's CPUs
    assert slots["gpu"] == [(True, 1.0, 1.0, 1)] * 2  # one per GPU, scoring there
    assert slots["cpu-torch"] == [(False, 4.0, 0.0, 4)]  # a GPU for Ray, but torch without CUDA: CPU actors
    assert "blind" not in slots


def test_device_choices_decide_which_nodes_take_actors():
    nodes = [node("cpu", 4), node("gpu", 4, gpus=1, cuda=True)]
    assert set(per_node(plan_actors(nodes, None, True))) == {"gpu"}  # --device cuda: GPU nodes only
    assert per_node(plan_actors(nodes, None, False))["gpu"] == [(False, 4.0, 0.0, 4)]  # --device cpu
    assert plan_actors([node("cpu", 4)], None, True) == []
    assert _gpu_policy("torch", "auto") is None and _gpu_policy("tensorrt", "auto") is True
    assert _gpu_policy("onnxruntime", "cuda") is False and _gpu_policy("torch", "cpu") is False
    with pytest.raises(ConfigError, match="cuda:1"):
        _gpu_policy("torch", "cuda:1")


def test_workers_spread_over_the_nodes_by_capacity():
    nodes = [node("eight", 8), node("four", 4)]
    slots = per_node(plan_actors(nodes, 3, None))
    assert slots == {"eight": [(False, 4.0, 0.0, 4)] * 2, "four": [(False, 4.0, 0.0, 4)]}
    crowded = per_node(plan_actors([node("two", 2)], 5, None))["two"]
    assert crowded == [(False, 0.4, 0.0, 1)] * 5  # more actors than CPUs: fractions Ray can place


def test_refused_connections_say_what_to_set():
    auth = RuntimeError("Failed to connect to GCS. Last connection error: Unauthenticated: InvalidAuthToken")
    message = _connect_error("10.0.0.1:6379", _caused(ConnectionError("Failed to connect to Ray cluster"), auth))
    assert "10.0.0.1:6379" in message and "RAY_AUTH_TOKEN" in message and "token" in message
    plain = _connect_error(None, ConnectionError("Failed to connect to Ray cluster at 10.0.0.2:6379"))
    assert "this machine belongs to" in plain and "--address local" in plain and "RAY_AUTH" not in plain


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


# --------------------------------------------------------------------------------------------------------------
# A cluster of `ray start` processes
# --------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A head and nodes started with ``ray start --block``, each in a session of its own: a node is stopped by
    signalling its process (SIGTERM: Ray stops what it started) or killed with its process group.

    Args:
        token: Token authentication with this token (None: authentication off).
    """

    def __init__(self, token: str | None = None):
        # Short: Ray's socket paths live under it and must fit in 107 bytes.
        self.temp = Path(tempfile.mkdtemp(prefix="fkray", dir="/tmp"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env = {
            **env, "RAY_TMPDIR": str(self.temp), "TMPDIR": str(self.temp), "OMP_NUM_THREADS": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token" if token else "disabled",
            # A dead node is noticed within seconds, not the default half minute.
            "RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4",
        }  # fmt: skip
        if token:
            self.env["RAY_AUTH_TOKEN"] = token
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: dict[str, subprocess.Popen] = {}
        try:
            self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "1", "--include-dashboard", "false"])
        except BaseException:
            shutil.rmtree(self.temp, ignore_errors=True)
            raise

    def add(self, name: str, cpus: int = 1, gpus: int = 0, hide: Path | None = None) -> None:
        """A node of ``cpus`` CPUs and ``gpus`` GPUs (for Ray); with ``hide``, that folder is empty there."""
        wrap: list[str] = []
        if hide is not None:
            wrap = [*hiding_namespace(), "sh", "-c", 'mount -t tmpfs tmpfs "$0" && exec "$@"', str(hide)]
        self._start(name, ["--address", self.address, "--num-cpus", str(cpus), "--num-gpus", str(gpus)], wrap)

    def _start(self, name: str, args: list[str], wrap: list[str] = ()) -> None:
        log = self.temp / f"{name}.log"
        command = [*wrap, str(Path(sys.executable).parent / "ray"), "start", *args, "--node-ip-address", "127.0.0.1",
                   "--node-name", name, "--dashboard-agent-listen-port", str(free_port()), "--disable-usage-stats",
                   "--block"]  # fmt: skip
        with open(log, "wb") as handle:
            process = subprocess.Popen(command, env=self.env, stdout=handle, stderr=subprocess.STDOUT,
                                       start_new_session=True)  # fmt: skip
        self.nodes[name] = process
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                self.stop(name)
                raise RuntimeError(f"ray start for {name} failed: {log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)

    def kill(self, name: str) -> None:
        """The node dies at once, as a machine that goes down: every process it started is killed, its actors'
        too (they would otherwise finish the calls in hand before noticing that their raylet is gone)."""
        process = self.nodes.pop(name)
        for pid in [process.pid, *descendants(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()

    def stop(self, name: str) -> None:
        """Stops a node as ``ray stop`` would, but only this one; killed where it takes too long."""
        process = self.nodes.pop(name)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever outlived it in its process group
        except ProcessLookupError:
            pass
        process.wait()

    def close(self) -> None:
        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            if name in self.nodes:
                self.stop(name)
        shutil.rmtree(self.temp, ignore_errors=True)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def hiding_namespace() -> list[str]:
    """The ``unshare`` prefix of a process with a mount namespace of its own (root, or a user namespace)."""
    return ["unshare", "-m", "--propagation", "private"] if os.geteuid() == 0 else ["unshare", "-Urm"]


def can_hide() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*hiding_namespace(), "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(autouse=True)
def bounded():
    """Every test of this file ends within TEST_LIMIT_S, whatever Ray does."""

    def expire(signum, frame):
        raise TimeoutError(f"test ran over {TEST_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TEST_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("ray", reason=RAY_REASON)
    if shutil.which(str(Path(sys.executable).parent / "ray")) is None:
        pytest.skip("the ray command is not installed beside this Python")
    cluster = Cluster()
    try:
        cluster.add("second", gpus=1)  # a GPU for Ray; whether torch can use it is the node's business
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def ray_env(monkeypatch):
    """This process talks to the clusters without a token and finds none by itself."""
    for name in [k for k in os.environ if k.startswith("RAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_TMPDIR", tempfile.gettempdir() + "/fkray-none")  # no ray_current_cluster here


@pytest.fixture(scope="module")
def region(tmp_path_factory) -> Path:
    return write_region(tmp_path_factory.mktemp("region"), height=150, width=130)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, checkpoint, region):
    return scan(tmp_path_factory.mktemp("local"), checkpoint, "local", manifest=str(region), **COMMON)


def assert_same_results(result, reference) -> None:
    # The same batches as the local engine; only torch's thread count differs (a last-bit difference at most).
    np.testing.assert_allclose(result.scores, reference.scores, rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(result.reasons, reference.reasons)
    assert [d.chips for d in result.detections] == [d.chips for d in reference.detections]


def cluster_report(result) -> dict:
    cluster = result.report["engine"]["cluster"]
    assert sum(n["tiles"] for n in cluster["nodes"]) == result.report["engine"]["tiles"]
    return cluster


def nodes_by_name(cluster: dict) -> dict[str, dict]:
    return {n["name"]: n for n in cluster["nodes"]}


def cli(argv: list[str], capsys) -> tuple[int, str]:
    code = fusionkern.cli.main(["scan", *argv])
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str, *named: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit status {code}: {err[-3000:]}"
    assert lines and lines[-1].startswith("error: "), lines[-20:]
    assert not [line for line in lines if "Traceback" in line], lines
    for name in named:
        assert name in lines[-1], f"{name!r} not in {lines[-1]!r}"
    return lines[-1]


# --------------------------------------------------------------------------------------------------------------
# Scans on the cluster
# --------------------------------------------------------------------------------------------------------------


def test_two_nodes_give_the_local_engine_results(cluster, checkpoint, region, reference, tmp_path):
    result = scan(tmp_path, checkpoint, engine="ray", address=cluster.address, manifest=str(region), **COMMON)
    assert_same_results(result, reference)
    report = cluster_report(result)
    nodes = nodes_by_name(report)
    assert set(nodes) == {"head", "second"} and not [n for n in nodes.values() if n["left_out"]]
    assert nodes["second"]["gpus"] == 1 and report["address"].endswith(f":{cluster.port}")
    worked = [n for n in nodes.values() if n["tiles"]]
    assert worked and all(n["actors"] == 1 and n["devices"] for n in worked)
    assert result.report["backend"]["device"] in ("cpu", "cpu, cuda", "cuda")
    saved = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert saved["engine"]["cluster"]["nodes"] == report["nodes"]


@pytest.mark.parametrize("found_by", ["ray_current_cluster", "RAY_ADDRESS", "a connection of this process"])
def test_without_address_the_scan_joins_this_machines_cluster(found_by, cluster, checkpoint, region, reference,
                                                              tmp_path, monkeypatch):  # fmt: skip
    import ray

    if found_by == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    elif found_by == "ray_current_cluster":
        monkeypatch.setenv("RAY_TMPDIR", str(cluster.temp))  # where `ray start` recorded the cluster
    else:
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        result = scan(tmp_path, checkpoint, engine="ray", manifest=str(region), **COMMON)
        assert ray.is_initialized() == (found_by == "a connection of this process")  # left as it was found
    finally:
        ray.shutdown()
    assert_same_results(result, reference)
    report = cluster_report(result)
    assert report["address"].endswith(f":{cluster.port}") and set(nodes_by_name(report)) == {"head", "second"}


@pytest.mark.parametrize("given_by", ["--address", "ray_current_cluster"])
def test_an_address_where_nothing_answers_is_one_error_line(given_by, checkpoint, region, tmp_path, capsys,
                                                            monkeypatch):  # fmt: skip
    pytest.importorskip("ray", reason=RAY_REASON)
    port = free_port()
    argv = [str(checkpoint), "--manifest", str(region), "--out", str(tmp_path / "out"), "--engine", "ray",
            "--no-progress"]
    if given_by == "--address":
        argv += ["--address", f"127.0.0.1:{port}"]
    else:  # a cluster that went down without `ray stop`
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    code, err = cli(argv, capsys)
    line = one_error_line(code, err, "cannot connect to the Ray cluster", f":{port}", "nothing answers")
    assert ("--address local" in line) == (given_by == "ray_current_cluster")
    assert not (tmp_path / "out").exists()


def test_with_no_cluster_anywhere_a_local_instance_does_the_scan(checkpoint, region, reference, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason=RAY_REASON)
    temp = Path(tempfile.mkdtemp(prefix="fkray", dir="/tmp"))
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    try:
        result = scan(tmp_path, checkpoint, engine="ray", workers=2, manifest=str(region), **COMMON)
        assert not ray.is_initialized()  # the instance started for the scan is stopped again
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert_same_results(result, reference)
    assert len(cluster_report(result)["nodes"]) == 1


def test_a_node_killed_mid_scan_costs_nothing(cluster, checkpoint, region, reference, tmp_path, monkeypatch):
    cluster.add("doomed")
    dispatch = ray_engine._Pool._dispatch

    def kill_while_busy(self, todo):  # tiles go out once the doomed node's actor is ready; it dies holding one
        doomed = [a for a in self.actors if a.node.name == "doomed"]
        if doomed and not doomed[0].ready:
            return
        dispatch(self, todo)
        if any(a.tile for a in doomed) and "doomed" in cluster.nodes:
            cluster.kill("doomed")

    monkeypatch.setattr(ray_engine._Pool, "_dispatch", kill_while_busy)
    result = scan(tmp_path, checkpoint, engine="ray", address=cluster.address, manifest=str(region), **COMMON)
    assert "doomed" not in cluster.nodes, "the node was never given a tile"
    assert_same_results(result, reference)
    report = cluster_report(result)
    assert report["actors_lost"] >= 1 and report["retries"] >= 1
    assert nodes_by_name(report)["doomed"]["left_out"] == "died during the scan"


def test_a_node_without_the_rasters_costs_that_node_only(cluster, checkpoint, region, reference, tmp_path, caplog):
    if not can_hide():
        pytest.skip("needs unshare to give a node a mount namespace of its own")
    cluster.add("blind", hide=region.parent)
    try:
        result = scan(tmp_path, checkpoint, engine="ray", address=cluster.address, manifest=str(region), **COMMON)
    finally:
        cluster.stop("blind")
    assert_same_results(result, reference)
    blind = nodes_by_name(cluster_report(result))["blind"]
    assert blind["left_out"].startswith("cannot read the inputs") and str(region.parent) in blind["left_out"]
    assert blind["actors"] == 0 and blind["tiles"] == 0
    assert any("blind" in r.getMessage() and "left out" in r.getMessage() for r in caplog.records)


def test_no_node_that_can_read_the_rasters_is_one_error_line(cluster, checkpoint, region, tmp_path):
    if not can_hide():
        pytest.skip("needs unshare to give the scan a mount namespace of its own")
    private = tmp_path / "private"  # empty on every node; the scan's own namespace holds the region there
    private.mkdir()
    out = tmp_path / "out"
    script = 'mount -t tmpfs tmpfs "$0" && cp "$1"/* "$0"/ && shift && exec "$@"'
    command = [*hiding_namespace(), "sh", "-c", script, str(private), str(region.parent), sys.executable, "-c",
               "import sys, fusionkern.cli as c; sys.exit(c.main(sys.argv[1:]))", "scan", str(checkpoint),
               "--manifest", str(private / region.name), "--out", str(out), "--engine", "ray", "--address",
               cluster.address, "--no-progress", "--no-quicklook", "--tile-px", "53"]  # fmt: skip
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    line = one_error_line(done.returncode, done.stderr, "no node of the Ray cluster", "can read the inputs",
                          str(private))
    assert "head" in line and "second" in line  # each node with what it could not read
    assert not out.exists(), "a scan that stops before its first tile leaves nothing"


def test_a_tile_that_fails_everywhere_is_one_error_line_and_finished_tiles_stay(cluster, checkpoint, region,
                                                                                tmp_path, capsys):  # fmt: skip
    broken = tmp_path / "region"
    shutil.copytree(region.parent, broken)
    raster = broken / "b10_2.tif"
    raster.write_bytes(raster.read_bytes()[: raster.stat().st_size * 3 // 4])  # the last blocks are gone
    out = tmp_path / "out"
    argv = [str(checkpoint), "--manifest", str(broken / region.name), "--out", str(out), "--engine", "ray",
            "--address", cluster.address, "--no-progress", "--no-quicklook", "--no-checksums", "--tile-px", "53"]
    code, err = cli(argv, capsys)
    line = one_error_line(code, err, "tile r000", "failed on node", str(raster))
    assert "head" in line and "second" in line  # tried on both nodes before giving up
    records = sorted((out / TILES_DIR).glob("*.npz"))
    assert records and not (out / "scan.json").exists()
    code, err = cli([*argv, "--resume"], capsys)  # the records are accepted: only the broken tiles are left
    one_error_line(code, err, "tile r000", str(raster))
    assert sorted((out / TILES_DIR).glob("*.npz")) == records


@pytest.mark.skipif(torch.version.cuda is not None, reason="the second node stands for a GPU node without CUDA torch")
def test_device_is_decided_by_the_nodes(cluster, checkpoint, region, tmp_path, capsys):
    argv = [str(checkpoint), "--manifest", str(region), "--out", str(tmp_path / "out"), "--engine", "ray",
            "--address", cluster.address, "--no-progress", "--tile-px", "53"]
    code, err = cli([*argv, "--device", "cuda"], capsys)
    line = one_error_line(code, err, "--device cuda needs GPU actors", "second", "without CUDA", "head")
    assert "no GPU" in line
    code, err = cli([*argv, "--device", "cuda:1"], capsys)
    one_error_line(code, err, "--device 'cuda:1'")
    assert not (tmp_path / "out").exists()


def test_exported_models_are_cached_per_node(cluster, checkpoint, region, reference, tmp_path):
    pytest.importorskip("onnxruntime", reason="the onnxruntime backend needs onnxruntime")
    result = scan(tmp_path, checkpoint, engine="ray", address=cluster.address, manifest=str(region),
                  backend="onnxruntime", **COMMON)  # fmt: skip
    np.testing.assert_allclose(result.scores, reference.scores, atol=1e-5, equal_nan=True)
    assert not (tmp_path / "out" / ".cache").exists()  # not the driver's folder on every node
    caches = {n["cache"] for n in cluster_report(result)["nodes"] if n["actors"]}
    assert caches and all(c and c.startswith(str(cluster.temp)) for c in caches)  # each node's own temp folder
    assert all(list(Path(c).glob("model-*.onnx")) for c in caches)


# --------------------------------------------------------------------------------------------------------------
# Token authentication
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_cluster():
    pytest.importorskip("ray", reason=RAY_REASON)
    cluster = Cluster(token="fusionkern-test-token-" + "0" * 40)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.mark.parametrize("token", ["right", "wrong"])
def test_token_authentication_is_handled_or_refused_in_one_line(token, token_cluster, checkpoint, region, tmp_path):
    home = tmp_path / "home"  # no ~/.ray/auth_token but the one the test means
    home.mkdir()
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), OMP_NUM_THREADS="1", RAY_TMPDIR=str(tmp_path / "ray"),
               RAY_AUTH_TOKEN=token_cluster.env["RAY_AUTH_TOKEN"] if token == "right" else "not-the-token",
               RAY_gcs_server_port_wait_time_s="3")  # fmt: skip
    command = [sys.executable, "-c", "import sys, fusionkern.cli as c; sys.exit(c.main(sys.argv[1:]))", "scan",
               str(checkpoint), "--manifest", str(region), "--out", str(out), "--engine", "ray", "--address",
               token_cluster.address, "--no-progress", "--no-quicklook", "--no-checksums", "--tile-px", "80"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if token == "right":
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((out / "scan.json").read_text())["counts"]["scored"] > 0
    else:
        one_error_line(done.returncode, done.stderr, token_cluster.address, "token", "RAY_AUTH_TOKEN")
        assert not out.exists()
