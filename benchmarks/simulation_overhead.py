"""Overhead of Flower's Ray simulation over the same federated run done sequentially in one process.

What is compared
----------------
For each number of clients ``K`` (``--clients 2 4``) and ``--repeats`` times, two runs of the *same*
:class:`fedtune.config.RunConfig` (same data, shards, steps, seeds and DP calibration), each in a fresh
Python process so that no cache (data, tokenizer, model) is shared between them:

* **sim**: ``fedtune.simulations.simulate.simulate(config)``: Flower's ``run_simulation`` on a local Ray
  cluster started for the run (one ``ClientAppActor`` per ``--cpus-per-client`` CPUs), shut down at
  the end.
* **seq**: the same federation without Ray or Flower's simulation runtime: ``prepare(config)`` then
  ``fedtune.server.app.run_server(grid, config)`` (the unchanged ServerApp body: LedgerStrategy over
  FedAvg, central evaluation, checkpoints, outputs) on a minimal in-process ``Grid`` whose
  ``send_and_receive`` calls the unchanged fedtune ``ClientApp`` (``make_client_app(config)``, i.e.
  ``client.app.train_round``: calibration, ledger, fresh model, ``set_trainable_state``,
  ``train_local``) for each client in turn. No client or server logic is copied here; what the sim
  run does on top is Ray/actor start-up, per-actor data and model loading, and moving Messages
  through the in-memory SuperLink and Ray (pickling, polling).

Timings (inside the measured process): the wall time of ``simulate()`` resp. ``prepare + run_server``
(the interpreter start and the imports common to both are excluded; ``flwr.simulation``/``ray``
imports are part of ``simulate()``), and a timeline from instrumentation wrappers installed in the
measured process only (no fedtune code is changed): ``prepare``, Ray start (``RayBackend.init_ray``),
actor pool build, ``run_server`` start/end, the round loop (``ServerRun.run``, logged as ``run_rounds``) start/end,
each ``send_and_receive`` (client phase of a round), each central ``evaluate``, and the backend's terminate.
Per-round ``seconds`` come from ``summary.json``. Each reply's own ``train_local`` seconds are captured from
the replies' metrics.

Memory: a thread in the parent polls the measured process and all its descendants (Ray's raylet, GCS,
workers are children of the driver) every ``--sample-interval`` seconds with psutil and keeps each
process' peak RSS; processes whose command line contains ``ClientAppActor`` are the clients' actors.
RSS counts shared pages (torch libraries) in every process, so sums overstate the machine's total.

Ray clean-up: every process seen in the run's tree is checked after the run has exited (immediately and
again after ``--leftover-wait`` seconds), and so is every process naming the run's Ray session.

Load: before each run the script waits until the 1-minute load average is below ``--max-load``
(polling every ``--load-poll`` s, at most ``--load-timeout`` s; if it never gets there the run starts
anyway and the table says so).

Outputs: ``<out-dir>/<name>.md`` (command, date, tables; also printed) and ``<out-dir>/<name>.json``.

Example
-------
::

    python benchmarks/simulation_overhead.py --clients 2 4 --rounds 2 --repeats 2
    python benchmarks/simulation_overhead.py --clients 2 --rounds 1 --max-train-examples 200 \\
        --local-steps 2 --max-eval-examples 50 --repeats 1 --max-load 0 --out-dir /tmp/so --name smoke
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = os.environ.get("FEDTUNE_DATA_DIR") or "/work/shared/data/glue"


# ================================================================================================
# measured process (``--_worker sim|seq``)
# ================================================================================================


class _Events:
    """Timestamped events of the measured process (epoch seconds, so the parent can line them up)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def add(self, name: str, **extra: Any) -> None:
        with self.lock:
            self.items.append({"event": name, "t": time.time(), **extra})


def _wrap(owner: Any, attr: str, events: _Events, name: str, after: Any = None) -> None:
    """Replace ``owner.attr`` by a wrapper logging ``name:start`` / ``name:end`` around the call."""
    original = getattr(owner, attr)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        events.add(f"{name}:start")
        try:
            result = original(*args, **kwargs)
        finally:
            events.add(f"{name}:end")
        if after is not None:
            after(args, kwargs, result)
        return result

    wrapper.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(owner, attr, wrapper)


def _make_sequential_grid(config: Any, events: _Events, probe: dict[str, Any]) -> Any:
    """A Grid that delivers each message to the unchanged fedtune ClientApp, in this process, in turn."""
    from uuid import uuid4

    from flwr.app import Context, Error, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import Grid
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.client.app import make_client_app

    # what run_simulation sets for its ServerApp thread (Message() needs it to fill the metadata)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID

    client_app = make_client_app(config)
    node_ids = {10_000 + i: i for i in range(config.clients)}  # node id -> partition id
    contexts = {
        node: Context(
            run_id=1,
            node_id=node,
            node_config={"partition-id": pid, "num-partitions": config.clients},
            state=RecordDict(),
            run_config={},
        )
        for node, pid in node_ids.items()
    }

    class SequentialGrid(Grid):
        def __init__(self) -> None:
            self._run: Any = None

        def set_run(self, run: Any) -> None:
            self._run = run

        @property
        def run(self) -> Any:
            return self._run

        def create_message(
            self, content: Any, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
        ) -> Any:
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

        def get_node_ids(self) -> list[int]:
            return list(node_ids)

        def push_messages(self, messages: Any) -> Any:
            """Run every ClientApp now, in this process; the replies wait for pull_messages."""
            messages = list(messages)
            self._outbox = self.send_and_receive(messages)
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, message_ids: Any) -> Any:
            replies, self._outbox = self._outbox, []
            return replies

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Any]:
            replies = []
            for message in messages:
                message.metadata.__dict__["_message_id"] = str(uuid4())
                node = message.metadata.dst_node_id
                try:
                    reply = client_app(message, contexts[node])
                except Exception as ex:  # same contract as Flower's simulation worker
                    from flwr.common.constant import ErrorCode

                    reply = Message(
                        Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(ex)}:<'{ex}'>"),
                        reply_to=message,
                    )
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                if "message" not in probe:
                    probe["message"], probe["reply"] = message, reply
                replies.append(reply)
            return replies

    return SequentialGrid()


def _serialisation_probe(probe: dict[str, Any], repeats: int = 20) -> dict[str, Any]:
    """Time pickling one train Message and its reply (what crosses the driver/actor boundary in Ray)."""
    import pickle

    out: dict[str, Any] = {}
    for key in ("message", "reply"):
        msg = probe.get(key)
        if msg is None:
            continue
        blob = pickle.dumps(msg, protocol=5)
        start = time.perf_counter()
        for _ in range(repeats):
            pickle.loads(pickle.dumps(msg, protocol=5))
        out[key] = {"pickled_bytes": len(blob), "ms_dumps_loads": 1000 * (time.perf_counter() - start) / repeats}
    return out


def _client_calibration(out: Path) -> dict[str, Any]:
    """Each client's stored calibration (sigma, plan): proof both modes calibrated the same."""
    result: dict[str, Any] = {}
    for path in sorted((out / "clients").glob("client-*/calibration.json")):
        data = json.loads(path.read_text())
        cal = data.get("calibration", {})
        result[path.parent.name] = {"sigma": cal.get("sigma"), "plan": data.get("key", {}).get("plan")}
    return result


def worker_main(mode: str, config_json: str, result_path: str, threads: int = 0) -> int:
    t_process = time.time()
    # imports common to both modes (not timed)
    import resource

    import torch
    import transformers  # noqa: F401

    import fedtune.client.app  # noqa: F401
    import fedtune.evaluate
    import fedtune.server.app as server_app
    import fedtune.simulations.simulate as simulation
    import fedtune.workload
    from fedtune.config import RunConfig
    from fedtune.server.strategy import LedgerStrategy

    if threads > 0:
        torch.set_num_threads(threads)
    t_imported = time.time()
    config = RunConfig.from_dict(json.loads(config_json))
    events = _Events()
    replies: list[dict[str, Any]] = []

    def keep_replies(args: Any, kwargs: Any, result: Any) -> None:
        server_round, msgs = args[1], list(args[2])
        for m in msgs:
            if m.has_error():
                replies.append({"round": server_round, "error": m.error.reason})
                continue
            metrics = dict(m.content["metrics"]) if "metrics" in m.content else {}
            privacy = dict(m.content["privacy"]) if "privacy" in m.content else {}
            replies.append(
                {
                    "round": server_round,
                    "client": privacy.get("client-id"),
                    "train_seconds": metrics.get("seconds"),
                    "train_loss": metrics.get("train-loss"),
                    "sigma": privacy.get("noise-multiplier"),
                    "steps": privacy.get("steps"),
                    "q": privacy.get("sampling-rate"),
                }
            )

    # instrumentation (this process only)
    _wrap(simulation, "prepare", events, "prepare")
    _wrap(server_app, "run_server", events, "run_server")
    from fedtune.server.run import ServerRun

    _wrap(ServerRun, "run", events, "run_rounds")  # the round loop
    _wrap(fedtune.evaluate, "evaluate", events, "evaluate")
    import fedtune.client.privacy
    import fedtune.data

    _wrap(fedtune.client.privacy, "calibrate_noise", events, "calibrate")  # seq only: sim calibrates in the actors
    _wrap(fedtune.data, "tokenize_dataset", events, "tokenize")
    _wrap(fedtune.workload.Workload, "build", events, "workload_build")
    _orig_agg = LedgerStrategy.aggregate_train

    def aggregate_train(self: Any, server_round: int, msgs: Any) -> Any:
        msgs = list(msgs)
        keep_replies((self, server_round, msgs), {}, None)
        return _orig_agg(self, server_round, msgs)

    LedgerStrategy.aggregate_train = aggregate_train  # type: ignore[method-assign]

    probe: dict[str, Any] = {}
    t0 = time.time()
    p0 = time.perf_counter()
    error = None
    summary: dict[str, Any] | None = None
    calibration: dict[str, Any] = {}
    try:
        if mode == "sim":
            from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

            import fedtune.server.run

            _wrap(RayBackend, "init_ray", events, "ray_init")
            _wrap(RayBackend, "build", events, "actor_pool_build")
            _wrap(RayBackend, "terminate", events, "backend_terminate")
            _wrap(fedtune.server.run, "exchange", events, "send_and_receive")  # the server's send-and-receive
            summary = simulation.simulate(config)
        else:
            simulation.prepare(config)
            grid = _make_sequential_grid(config, events, probe)
            _wrap(fedtune.server.run, "exchange", events, "send_and_receive")
            summary = server_app.run_server(grid, config)
        calibration = _client_calibration(config.out_dir)
    except BaseException as ex:  # noqa: BLE001 - report, never hang
        import traceback

        error = "".join(traceback.format_exception(ex))
    seconds = time.perf_counter() - p0
    t1 = time.time()
    result = {
        "mode": mode,
        "seconds": seconds,
        "t_process_start": t_process,
        "t_imported": t_imported,
        "t_start": t0,
        "t_end": t1,
        "events": events.items,
        "replies": replies,
        "summary": None
        if summary is None
        else {
            "final_accuracy": summary.get("final_accuracy"),
            "composed_epsilon": summary.get("composed_epsilon"),
            "seconds": summary.get("seconds"),
            "rounds": [
                {
                    k: r.get(k)
                    for k in ("round", "accuracy", "seconds", "clients_trained", "bytes_sent", "bytes_received")
                }
                for r in summary.get("rounds", [])
            ],
            "bytes_per_round": summary.get("bytes_per_round"),
            "rejected_updates": summary.get("rejected_updates"),
        },
        "calibration": calibration,
        "serialisation": _serialisation_probe(probe) if probe else None,
        "torch_threads": torch.get_num_threads(),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "error": error,
    }
    Path(result_path).write_text(json.dumps(result, default=str))
    return 0 if error is None else 1


# ================================================================================================
# parent: scheduling, memory sampling, clean-up checks, report
# ================================================================================================


class TreeSampler(threading.Thread):
    """Polls a process and its descendants; keeps per-process peak RSS and a few facts."""

    def __init__(self, root_pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.root_pid = root_pid
        self.interval = interval
        self.stop_event = threading.Event()
        self.procs: dict[int, dict[str, Any]] = {}
        self.peak_total = 0
        self.peak_actors_total = 0
        self.samples = 0
        self.session: str | None = None

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.sample()
            self.stop_event.wait(self.interval)

    def sample(self) -> None:
        ps = self.psutil
        try:
            root = ps.Process(self.root_pid)
            tree = [root, *root.children(recursive=True)]
        except (ps.NoSuchProcess, ps.AccessDenied):
            return
        now = time.time()
        total = actors = 0
        for proc in tree:
            try:
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cmd = " ".join(proc.cmdline())
                    threads = proc.num_threads()
                    created = proc.create_time()
                    cpu = proc.cpu_times()
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
            info = self.procs.get(proc.pid)
            if info is None or info["create_time"] != created:
                info = self.procs[proc.pid] = {
                    "pid": proc.pid,
                    "create_time": created,
                    "first_seen": now,
                    "peak_rss": 0,
                    "kind": "other",
                    "cmd": cmd[:120],
                    "max_threads": 0,
                }
            if proc.pid == self.root_pid:
                info["kind"] = "driver"
            elif "ClientAppActor" in cmd:
                if info["kind"] != "actor":
                    info["kind"], info["became_actor"] = "actor", now
                    try:
                        env = proc.environ()
                        info["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS")
                    except (ps.AccessDenied, ps.NoSuchProcess):
                        pass
                info["cmd"] = cmd[:120]
            if self.session is None and "--session-name=" in cmd:
                self.session = cmd.split("--session-name=", 1)[1].split()[0]
            info["peak_rss"] = max(info["peak_rss"], rss)
            info["max_threads"] = max(info["max_threads"], threads)
            info["cpu_s"] = cpu.user + cpu.system
            if info["kind"] in ("actor", "driver"):
                info.setdefault("timeline", []).append((round(now, 2), round(rss / 2**20, 1), round(info["cpu_s"], 1)))
            info["last_seen"] = now
            total += rss
            if info["kind"] == "actor":
                actors += rss
        self.peak_total = max(self.peak_total, total)
        self.peak_actors_total = max(self.peak_actors_total, actors)
        self.samples += 1

    def leftovers(self) -> list[dict[str, Any]]:
        """Processes of this run's tree (or naming its Ray session) still alive."""
        ps = self.psutil
        alive = []
        for pid, info in self.procs.items():
            try:
                proc = ps.Process(pid)
                if abs(proc.create_time() - info["create_time"]) < 1e-3 and proc.status() != ps.STATUS_ZOMBIE:
                    alive.append({"pid": pid, "cmd": " ".join(proc.cmdline())[:120]})
            except (ps.NoSuchProcess, ps.AccessDenied, ps.ZombieProcess):
                continue
        if self.session:
            seen = {a["pid"] for a in alive}
            for proc in ps.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                except (ps.NoSuchProcess, ps.AccessDenied):
                    continue
                if self.session in cmd and proc.pid not in seen and proc.pid != os.getpid():
                    alive.append({"pid": proc.pid, "cmd": cmd[:120]})
        return alive


def wait_for_load(max_load: float, poll: float, timeout: float) -> dict[str, Any]:
    start = time.time()
    load = os.getloadavg()[0]
    while max_load > 0 and load >= max_load and time.time() - start < timeout:
        print(
            f"  load average {load:.2f} >= {max_load}; waiting ({time.time() - start:.0f}/{timeout:.0f} s)", flush=True
        )
        time.sleep(poll)
        load = os.getloadavg()[0]
    return {
        "load_1min": load,
        "load_all": list(os.getloadavg()),
        "waited_s": time.time() - start,
        "below_max": max_load <= 0 or load < max_load,
    }


def run_one(
    mode: str, config: dict[str, Any], args: argparse.Namespace, scratch: Path, tag: str, first: bool, threads: int = 0
) -> dict[str, Any]:
    run_dir = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=scratch))
    cfg = dict(config, out=str(run_dir / "out"))
    result_path = run_dir / "result.json"
    log_path = run_dir / "log.txt"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_worker",
        mode,
        "--_config",
        json.dumps(cfg),
        "--_result",
        str(result_path),
        "--_threads",
        str(threads),
    ]
    load = wait_for_load(args.max_load, args.load_poll, args.load_timeout if first else args.load_timeout_between)
    label = mode if not threads else f"{mode} ({threads} thread(s))"
    print(f"[{tag}] {label}: start (load {load['load_1min']:.2f})", flush=True)
    t_launch = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(HERE.parent))
        sampler = TreeSampler(proc.pid, args.sample_interval)
        sampler.start()
        rc = proc.wait()
    t_exit = time.time()
    sampler.stop_event.set()
    sampler.join()
    leftovers_now = sampler.leftovers()
    if leftovers_now:
        time.sleep(args.leftover_wait)
    leftovers_later = sampler.leftovers() if leftovers_now else []
    load_end = list(os.getloadavg())
    result: dict[str, Any] = {
        "mode": mode,
        "tag": tag,
        "returncode": rc,
        "process_seconds": t_exit - t_launch,
        "t_launch": t_launch,
        "load_before": load,
        "load_after": load_end,
    }
    if result_path.exists():
        result.update(json.loads(result_path.read_text()))
    if rc != 0 or result.get("error"):
        tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
        result["log_tail"] = tail
        print(f"[{tag}] {mode}: FAILED (rc {rc})\n{result.get('error') or tail}", flush=True)
    procs = list(sampler.procs.values())
    actors = [p for p in procs if p["kind"] == "actor"]
    driver = [p for p in procs if p["kind"] == "driver"]
    others = [p for p in procs if p["kind"] == "other"]
    mb = 1024.0**2
    result["memory"] = {
        "samples": sampler.samples,
        "driver_peak_rss_mb": driver[0]["peak_rss"] / mb if driver else None,
        "actor_peak_rss_mb": sorted(round(a["peak_rss"] / mb, 1) for a in actors),
        "actors": len(actors),
        "actor_omp_threads": sorted({str(a.get("OMP_NUM_THREADS")) for a in actors}),
        "actor_cpu_s": sorted(round(a.get("cpu_s", 0.0), 1) for a in actors),
        "actor_max_threads": sorted(a["max_threads"] for a in actors),
        "driver_cpu_s": driver[0].get("cpu_s") if driver else None,
        "other_cpu_s_sum": sum(p.get("cpu_s", 0.0) for p in others),
        "actor_first_seen_s": sorted(round(a["first_seen"] - result.get("t_start", t_launch), 2) for a in actors),
        "other_ray_peak_rss_mb_sum": sum(p["peak_rss"] for p in others) / mb,
        "other_processes": len(others),
        "tree_peak_rss_mb": sampler.peak_total / mb,
        "actors_peak_rss_mb_sum": sampler.peak_actors_total / mb,
    }
    result["memory"]["timelines"] = {f"{p['kind']}-{p['pid']}": p.get("timeline", []) for p in actors + driver}
    result["ray_session"] = sampler.session
    result["leftovers_immediately"] = leftovers_now
    result["leftovers_after_wait"] = leftovers_later
    shutil.rmtree(run_dir, ignore_errors=True)
    result["temp_removed"] = not run_dir.exists()
    summ = result.get("summary") or {}
    print(
        f"[{tag}] {label}: {result.get('seconds', float('nan')):.1f} s, accuracy {summ.get('final_accuracy')}, "
        f"leftover processes {len(leftovers_later) if leftovers_now else 0}",
        flush=True,
    )
    return result


# -- analysis ------------------------------------------------------------------------------------
def _first(events: list[dict[str, Any]], name: str) -> float | None:
    for e in events:
        if e["event"] == name:
            return e["t"]
    return None


def _last(events: list[dict[str, Any]], name: str) -> float | None:
    found = None
    for e in events:
        if e["event"] == name:
            found = e["t"]
    return found


def _spans(events: list[dict[str, Any]], name: str) -> list[float]:
    out, start = [], None
    for e in events:
        if e["event"] == f"{name}:start":
            start = e["t"]
        elif e["event"] == f"{name}:end" and start is not None:
            out.append(e["t"] - start)
            start = None
    return out


def breakdown(result: dict[str, Any]) -> dict[str, Any]:
    """Timeline split of one run (seconds)."""
    ev, t0, t1 = result.get("events", []), result.get("t_start"), result.get("t_end")
    if not ev or t0 is None:
        return {}
    rounds = [r for r in (result.get("summary") or {}).get("rounds", []) if r.get("round", 0) >= 1]
    rr_start, rr_end = _first(ev, "run_rounds:start"), _last(ev, "run_rounds:end")
    rs_end = _last(ev, "run_server:end")
    out: dict[str, Any] = {
        "total": result.get("seconds"),
        "prepare": (_first(ev, "prepare:end") or t0) - t0,
        "before_rounds": (rr_start - t0)
        if rr_start
        else None,  # prepare + server set-up + round-0 eval (+ Ray start, concurrently)
        "rounds_total": (rr_end - rr_start) if rr_start and rr_end else None,
        "round_seconds": [r.get("seconds") for r in rounds],
        "client_phase": _spans(ev, "send_and_receive"),
        "evaluate": _spans(ev, "evaluate"),
        "calibrate": _spans(ev, "calibrate"),
        "tokenize": _spans(ev, "tokenize"),
        "workload_build": _spans(ev, "workload_build"),
        "after_rounds": (t1 - rr_end) if rr_end else None,  # adapter, plot, summary, Ray shutdown
        "server_outputs": (rs_end - rr_end) if rs_end and rr_end else None,
        "after_server": (t1 - rs_end) if rs_end else None,
    }
    if result.get("mode") == "sim":
        ri0, ri1 = _first(ev, "ray_init:start"), _first(ev, "ray_init:end")
        ab0, ab1 = _first(ev, "actor_pool_build:start"), _first(ev, "actor_pool_build:end")
        out["ray_init"] = (ri1 - ri0) if ri0 and ri1 else None
        out["actor_pool_build"] = (ab1 - ab0) if ab0 and ab1 else None
        out["ray_ready_after_start"] = (ab1 - t0) if ab1 else None
        bt0, bt1 = _first(ev, "backend_terminate:start"), _first(ev, "backend_terminate:end")
        out["backend_terminate"] = (bt1 - bt0) if bt0 and bt1 else None
    train = {}
    for rep in result.get("replies", []):
        if rep.get("train_seconds") is not None:
            train.setdefault(rep["round"], []).append(rep["train_seconds"])
    out["train_local_seconds"] = {str(k): v for k, v in sorted(train.items())}
    return out


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _cpu_total(result: dict[str, Any]) -> float | None:
    mem = result.get("memory", {})
    if mem.get("driver_cpu_s") is None:
        return None
    return mem["driver_cpu_s"] + sum(mem.get("actor_cpu_s", [])) + mem.get("other_cpu_s_sum", 0.0)


def build_report(data: dict[str, Any]) -> str:
    lines = [
        "# Simulation overhead: Flower/Ray simulation vs. the same run sequentially in one process",
        "",
        f"Date: {data['date']}  ",
        f"Command: `{data['command']}`  ",
        f"Host: {data['host']['cpus']} CPUs, {data['host']['platform']}; Python {data['host']['python']}, "
        f"torch {data['host']['torch']}, flwr {data['host']['flwr']}, ray {data['host']['ray']}  ",
        f"Settings: {data['settings_text']}",
        "",
        "`seq` = `prepare` + `run_server` on an in-process Grid that calls the unchanged fedtune ClientApp for each "
        "client in turn; `sim` = `fedtune.simulations.simulate.simulate`. "
        "Each run in a fresh process; times exclude interpreter "
        "start and imports common to both. Load = 1-minute load average when the run started.",
        "",
        "## Wall time",
        "",
        "Every run of a row used the same configuration; `seq, N thr` is the sequential baseline with N torch threads "
        "(Ray gives each actor `OMP_NUM_THREADS` = CPUs per client). Loads in run order.",
        "",
    ]
    keys = data["pairs"][0]["seq_keys"] if data["pairs"] else ["seq"]

    def thr(pair: dict[str, Any], key: str) -> str:
        return f"{pair[key].get('torch_threads')} thr"

    head = (
        ["K", "R", "rep"]
        + [f"seq s ({thr(data['pairs'][0], k)})" for k in keys]
        + ["sim s"]
        + [f"sim/seq ({thr(data['pairs'][0], k)})" for k in keys]
        + [
            "sim rounds s (per round)",
            "seq rounds s (per round)",
            "sim before rounds s",
            "sim after rounds s",
            "accuracy (all runs)",
            "load at start",
        ]
    )
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for pair in data["pairs"]:
        seq, sim = pair["seq"], pair["sim"]
        bs, bq = sim.get("breakdown", {}), seq.get("breakdown", {})
        cells = [str(pair["clients"]), str(pair["rounds"]), str(pair["repeat"])]
        cells += [_fmt(pair[k].get("seconds")) for k in keys] + [_fmt(sim.get("seconds"))]
        cells += [f"{_fmt(pair['ratios'].get(k), 2)}x" for k in keys]
        cells += [
            f"{_fmt(bs.get('rounds_total'))} ({', '.join(_fmt(s) for s in bs.get('round_seconds', []))})",
            f"{_fmt(bq.get('rounds_total'))} ({', '.join(_fmt(s) for s in bq.get('round_seconds', []))})",
            _fmt(bs.get("before_rounds")),
            _fmt(bs.get("after_rounds")),
            " / ".join(_fmt((pair[k].get("summary") or {}).get("final_accuracy"), 3) for k in [*keys, "sim"]),
            " / ".join(_fmt(pair[k]["load_before"]["load_1min"], 2) for k in [*keys, "sim"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Where the simulation's time goes (seconds from the start of `simulate()`)",
        "",
        "| K | rep | prepare (driver data+model) | Ray init | actor pool build | Ray+actors ready at | round-0 eval "
        "| client phase per round sim (seq) | eval per round | train_local per client, round 1 / 2 sim (seq) "
        "| seq: calibration, tokenization (sums) | outputs + shutdown |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in data["pairs"]:
        seq, sim = pair["seq"], pair["sim"]
        bs, bq = sim.get("breakdown", {}), seq.get("breakdown", {})
        ev = bs.get("evaluate", [])

        def tl(b: dict[str, Any]) -> str:
            t = b.get("train_local_seconds", {})
            return " / ".join(",".join(_fmt(x) for x in t.get(str(r), [])) for r in sorted(int(k) for k in t))

        lines.append(
            f"| {pair['clients']} | {pair['repeat']} | {_fmt(bs.get('prepare'))} | {_fmt(bs.get('ray_init'))} | "
            f"{_fmt(bs.get('actor_pool_build'))} | "
            f"{_fmt(bs.get('ray_ready_after_start'))} | {_fmt(ev[0] if ev else None)} | "
            f"{', '.join(_fmt(x) for x in bs.get('client_phase', []))} "
            f"({', '.join(_fmt(x) for x in bq.get('client_phase', []))}) | "
            f"{', '.join(_fmt(x) for x in ev[1:])} | {tl(bs)} ({tl(bq)}) | {_fmt(sum(bq.get('calibrate', [])))}, "
            f"{_fmt(sum(bq.get('tokenize', [])))} | {_fmt(bs.get('after_rounds'))} |"
        )
    lines += [
        "",
        f"## Memory (peak RSS, MB; sampled every {data['settings']['sample_interval']:.1f} s)",
        "",
        "| K | rep | actors | peak RSS per ClientAppActor | actor CPU s (max threads) | sim driver "
        "| other Ray processes (sum of peaks) | sim tree peak (sum) | seq process | leftover processes after sim |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in data["pairs"]:
        seq, sim = pair["seq"], pair["sim"]
        ms, mq = sim.get("memory", {}), seq.get("memory", {})
        left = sim.get("leftovers_after_wait") if sim.get("leftovers_immediately") else []
        lines.append(
            f"| {pair['clients']} | {pair['repeat']} | {ms.get('actors')} | "
            f"{', '.join(_fmt(x, 0) for x in ms.get('actor_peak_rss_mb', []))} | "
            f"{', '.join(_fmt(x) for x in ms.get('actor_cpu_s', []))} "
            f"({', '.join(str(x) for x in ms.get('actor_max_threads', []))}) | "
            f"{_fmt(ms.get('driver_peak_rss_mb'), 0)} | {_fmt(ms.get('other_ray_peak_rss_mb_sum'), 0)} "
            f"({ms.get('other_processes')} procs) | {_fmt(ms.get('tree_peak_rss_mb'), 0)} | "
            f"{_fmt(mq.get('driver_peak_rss_mb'), 0)} | "
            f"{len(left) if left else 'none'} |"
        )
    ser = next((p["seq"].get("serialisation") for p in data["pairs"] if p["seq"].get("serialisation")), None)
    lines += ["", "## Other facts", ""]
    if ser:
        sent, reply = ser.get("message", {}), ser.get("reply", {})
        lines.append(
            f"- One train Message pickles to {sent.get('pickled_bytes')} bytes "
            f"({sent.get('ms_dumps_loads', float('nan')):.2f} ms dumps+loads), "
            f"its reply to {reply.get('pickled_bytes')} bytes ({reply.get('ms_dumps_loads', float('nan')):.2f} ms)."
        )
    for pair in data["pairs"]:
        cs, cq = pair["sim"].get("calibration", {}), pair["seq"].get("calibration", {})
        same = cs == cq and bool(cs)
        lines.append(
            f"- K={pair['clients']} rep {pair['repeat']}: client calibrations identical in both modes: {same} "
            f"(sigma {sorted({round(v['sigma'], 4) for v in cs.values() if v.get('sigma')})}); "
            f"torch threads seq {pair['seq'].get('torch_threads')}, sim driver {pair['sim'].get('torch_threads')}; "
            f"CPU seconds sim {_fmt(_cpu_total(pair['sim']))} "
            f"(driver {_fmt(pair['sim'].get('memory', {}).get('driver_cpu_s'))}, "
            f"actors {_fmt(sum(pair['sim'].get('memory', {}).get('actor_cpu_s', [])))}, other Ray "
            f"{_fmt(pair['sim'].get('memory', {}).get('other_cpu_s_sum'))}) vs seq {_fmt(_cpu_total(pair['seq']))} "
            "(whole processes, imports included)."
        )
    lines.append(
        f"- Ray processes of these runs alive at the end: {data['final_ray_check']['ours']}; "
        f"other `ray::` processes on the machine (not started here): {data['final_ray_check']['others']}."
    )
    for pair in data["pairs"]:
        for key in pair.get("seq_keys", [])[1:]:
            bk = pair[key].get("breakdown", {})
            lines.append(
                f"- K={pair['clients']} rep {pair['repeat']}, "
                f"seq with {pair[key].get('torch_threads')} torch thread(s): "
                f"client phase per round {', '.join(_fmt(x) for x in bk.get('client_phase', []))} s, "
                "train_local per client "
                f"{' / '.join(','.join(_fmt(x) for x in v) for v in bk.get('train_local_seconds', {}).values())} s, "
                f"CPU seconds {_fmt(_cpu_total(pair[key]))}, "
                f"peak RSS {_fmt(pair[key].get('memory', {}).get('driver_peak_rss_mb'), 0)} MB."
            )
    if not all(p[k]["load_before"]["below_max"] for p in data["pairs"] for k in [*p.get("seq_keys", ["seq"]), "sim"]):
        lines.append(
            f"- WARNING: at least one run started with the load average above {data['settings']['max_load']} "
            "(waited the maximum); the machine was shared, timings are noisy."
        )
    return "\n".join(lines) + "\n"


def final_ray_check(results: list[dict[str, Any]]) -> dict[str, Any]:
    import psutil

    sessions = {r.get("ray_session") for r in results if r.get("ray_session")}
    ours, others = [], []
    for proc in psutil.process_iter(["pid", "cmdline", "name"]):
        try:
            cmd = " ".join(proc.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "ray::" not in cmd and "/ray/" not in cmd:
            continue
        if any(s in cmd for s in sessions):
            ours.append({"pid": proc.pid, "cmd": cmd[:100]})
        elif "ray::" in cmd:
            others.append({"pid": proc.pid, "cmd": cmd[:100]})
    # leftover processes recorded per run (tree members still alive)
    for r in results:
        for left in r.get("leftovers_after_wait") or []:
            if psutil.pid_exists(left["pid"]) and left not in ours:
                ours.append(left)
    return {"ours": len(ours), "ours_list": ours, "others": len(others), "others_list": others}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4], help="numbers of clients K to measure")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--task", default="sst2")
    p.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 (fedtune's default)")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--max-train-examples", type=int, default=2000)
    p.add_argument("--max-eval-examples", type=int, default=200)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epsilon", type=float, default=8.0, help="inf = no DP")
    p.add_argument("--cpus-per-client", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--seq-threads",
        type=int,
        nargs="+",
        default=[0],
        help="torch threads of the sequential baseline, one seq run per value (0 = torch's default); "
        "the first is the reference of sim/seq in the detail tables",
    )
    p.add_argument(
        "--max-load",
        type=float,
        default=1.0,
        help="wait before each run until the 1-min load average is below this (0: no wait)",
    )
    p.add_argument("--load-poll", type=float, default=30.0)
    p.add_argument("--load-timeout", type=float, default=2400.0, help="longest wait before the first run (s)")
    p.add_argument(
        "--load-timeout-between",
        type=float,
        default=300.0,
        help="longest wait before each later run (s): our own runs raise the load",
    )
    p.add_argument("--sample-interval", type=float, default=0.5)
    p.add_argument("--leftover-wait", type=float, default=5.0)
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--name", default="simulation_overhead")
    p.add_argument("--_worker", choices=["sim", "seq"], help=argparse.SUPPRESS)
    p.add_argument("--_config", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    p.add_argument("--_threads", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "flwr", "ray"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "?"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        return worker_main(args._worker, args._config, args._result, args._threads)

    epsilon = float(args.epsilon)
    base = {
        "task": args.task,
        "model": args.model,
        "data_dir": args.data_dir,
        "rounds": args.rounds,
        "epsilon": epsilon,
        "local_steps": args.local_steps,
        "batch_size": args.batch_size,
        "max_train_examples": args.max_train_examples,
        "max_eval_examples": args.max_eval_examples,
        "cpus_per_client": args.cpus_per_client,
        "seed": args.seed,
    }
    if epsilon == float("inf"):
        base["epsilon"] = "inf"
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, HERE.parent), *sys.argv[1:]])
    scratch = Path(tempfile.mkdtemp(prefix="fedtune-simoverhead-"))
    results: list[dict[str, Any]] = []
    pairs: list[dict[str, Any]] = []
    try:
        for k in args.clients:
            for rep in range(1, args.repeats + 1):
                config = dict(base, clients=k)
                pair: dict[str, Any] = {"clients": k, "rounds": args.rounds, "repeat": rep}
                runs = [("seq" if i == 0 else f"seq_t{t}", "seq", t) for i, t in enumerate(args.seq_threads)] + [
                    ("sim", "sim", 0)
                ]
                for key, mode, threads in runs:  # interleaved so drifts in load hit all
                    res = run_one(mode, config, args, scratch, f"K{k}-r{rep}", first=not results, threads=threads)
                    res["breakdown"] = breakdown(res)
                    res["key"] = key
                    results.append(res)
                    pair[key] = res
                pair["seq_keys"] = [key for key, mode, _ in runs if mode == "seq"]
                pair["ratios"] = {}
                for key in pair["seq_keys"]:
                    seq, sim = pair[key], pair["sim"]
                    if seq.get("seconds") and sim.get("seconds") and not seq.get("error") and not sim.get("error"):
                        pair["ratios"][key] = sim["seconds"] / seq["seconds"]
                pair["ratio"] = pair["ratios"].get("seq")
                pairs.append(pair)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    check = final_ray_check(results)
    versions = _versions()
    data = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            **versions,
        },
        "settings": vars(args) | {"_worker": None, "_config": None, "_result": None},
        "settings_text": (
            f"{args.task}, model {args.model or 'all-MiniLM-L6-v2 (default)'}, R={args.rounds}, "
            f"{args.max_train_examples} train / {args.max_eval_examples} eval examples, "
            f"{args.local_steps} local steps, "
            f"batch {args.batch_size}, epsilon {args.epsilon:g}, {args.cpus_per_client:g} CPU per client, "
            f"{args.repeats} repeat(s), seq torch threads {args.seq_threads} (0 = default), data {args.data_dir}"
        ),
        "pairs": pairs,
        "final_ray_check": check,
        "scratch_removed": not scratch.exists(),
    }
    report = build_report(data)
    print(report)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.md").write_text(report)
    (out_dir / f"{args.name}.json").write_text(json.dumps(data, indent=1, default=str))
    failed = [r for r in results if r.get("error") or r.get("returncode")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
