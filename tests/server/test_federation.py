"""A real deployment on 127.0.0.1: ``fedtune server`` and two ``fedtune client`` processes over TLS with
SuperNode authentication, training all-MiniLM-L6-v2 on real SST-2 shards (80 examples each, 2 steps per round).

One federation, one timeline (shared by the tests below, to keep the module at a few minutes):

1. while the server waits for its clients, an unregistered client, a client without TLS and a client
   trusting another CA try to join and are refused; the Control API is not reachable on the public port;
2. alice and bob join; round 1 runs;
3. after round 1's checkpoint the whole server (gateway, SuperLink, SuperExec, ServerApp) is SIGKILLed
   and restarted with ``fedtune server --resume``;
4. as soon as the resumed run's round 2 reaches bob, bob is SIGKILLed (mid-round);
5. the run finishes: round 2 with alice only (min-clients 1); alice is stopped.

Every process started here is stopped, also when a step fails (process trees are collected and killed).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from federation_kit import Federation, checkpoint_round, prepare

from fedtune.deployment import free_port
from fedtune.privacy.ledger import PrivacyLedger

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

RUN = [
    "--clients",
    "2",
    "--rounds",
    "2",
    "--epsilon",
    "8",
    "--delta",
    "1e-5",
    "--local-steps",
    "2",
    "--batch-size",
    "16",
    "--max-length",
    "64",
    "--max-eval-examples",
    "50",
    "--seed",
    "3",
    "--min-clients",
    "1",
    "--round-retries",
    "1",
    "--round-timeout",
    "150",
    "--wait-timeout",
    "120",
]


def _refusals(fed: Federation) -> None:
    """Clients that must not get in, tried while the server waits for its clients."""
    attempts = {
        "unregistered": fed.client_args("mallory", **{"--max-wait-time": "20"}),
        "plaintext": fed.client_args(
            "mallory", **{"--insecure": "", "--root-certificates": None, "--auth-key": None, "--max-wait-time": "8"}
        ),
        "other-ca": fed.client_args(
            "alice",
            **{
                "--root-certificates": str(fed.root / "other-ca" / "ca.crt"),
                "--max-wait-time": "8",
                "--state-dir": str(fed.root / "alice-other-ca-state"),
            },
        ),
    }
    running = {
        label: subprocess.Popen(
            [sys.executable, "-m", "fedtune.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=fed.env,
            start_new_session=True,
        )
        for label, args in attempts.items()
    }
    fed.procs.extend(running.values())  # type: ignore[arg-type]
    for label, proc in running.items():  # all at once: each waits on the network, not the CPU
        stdout, stderr = proc.communicate(timeout=120)
        fed.refusals[label] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    ca = str(fed.machine("alice") / "ca.crt")
    with httpx.Client(base_url=f"https://127.0.0.1:{fed.port}", verify=ca, timeout=20) as client:
        fed.control_status = client.post("/v1/control/list-runs", content=b"").status_code
        fed.fleet_status = client.post("/v1/fleet/activate-node", content=b"\x00").status_code


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    prepare(root, glue_dir)
    env = {**os.environ, "FEDTUNE_DATA_DIR": str(glue_dir), "PYTHONUNBUFFERED": "1"}
    fed = Federation(root, free_port(), env)
    started = time.monotonic()
    try:
        server = fed.start("server", *fed.server_args(RUN))
        fed.wait("the SuperLink", lambda: "SuperLink ready" in fed.log("server") or server.poll() is not None, 120)
        assert server.poll() is None, fed.log("server")
        _refusals(fed)
        alice = fed.start("alice", *fed.client_args("alice"))
        bob = fed.start("bob", *fed.client_args("bob"))
        fed.wait("round 1's checkpoint", lambda: checkpoint_round(fed.out) >= 1 or server.poll() is not None, 300)
        # the server machine dies: gateway, SuperLink, SuperExec and ServerApp at once
        fed.killed_server = fed.kill_tree(server)
        time.sleep(2)
        fed.server_left_after_kill = [p.name() for p in fed.ours(flwr_home=str(fed.out / "deploy" / "flwr-home"))]
        resumed = fed.start("server-resumed", "server", "--resume", str(fed.out))
        fed.wait(
            "the resumed run", lambda: "resumed run" in fed.log("server-resumed") or resumed.poll() is not None, 120
        )
        match = re.search(r"resumed run (\d+)", fed.log("server-resumed"))
        assert match, fed.log("server-resumed")
        fed.resumed_run = int(match.group(1))
        # bob dies as soon as the resumed run's round 2 reaches him
        fed.wait("round 2 at bob", lambda: f"[RUN {fed.resumed_run}" in fed.log("bob"), 240)
        fed.kill_tree(bob)
        fed.bob_killed_at = time.monotonic()
        fed.server_rc = resumed.wait(timeout=600)
        fed.alice_rc = (alice.send_signal(signal.SIGTERM), alice.wait(timeout=60))[1]
        time.sleep(2)
        fed.leftovers = [f"{p.pid} {' '.join(p.cmdline())[:120]}" for p in fed.ours()]
        print(f"\nfederation timeline: {time.monotonic() - started:.0f} s")
        yield fed
    finally:
        fed.stop_everything()


def _ledger(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    return {(e["client_id"], e["round"]): e for e in PrivacyLedger.load(path).to_dict()["entries"]}


def test_unregistered_and_unencrypted_clients_are_refused(federation: Federation) -> None:
    unregistered = federation.refusals["unregistered"]
    assert unregistered.returncode != 0 and "Failed to activate SuperNode" in unregistered.stdout + unregistered.stderr
    plaintext = federation.refusals["plaintext"]
    assert plaintext.returncode != 0 and "NO TLS" in plaintext.stderr
    assert "Failed to initialize the connection" in plaintext.stdout + plaintext.stderr
    other_ca = federation.refusals["other-ca"]
    assert other_ca.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in other_ca.stdout + other_ca.stderr
    # none of them ever trained or got a node
    assert not (federation.machine("mallory") / "data" / "state" / "ledger.json").exists()
    server_log = (federation.out / "deploy" / "logs" / "superlink.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in server_log


def test_only_the_fleet_api_is_exposed(federation: Federation) -> None:
    assert federation.control_status == 404  # nobody can register a key or start a run through the public port
    assert (
        federation.fleet_status != 404
    )  # the Fleet API answers (here: a garbage request is rejected by the SuperLink)


def test_the_run_finishes_with_every_output(federation: Federation) -> None:
    assert federation.server_rc == 0, federation.log("server-resumed")[-3000:]
    out = federation.out
    for name in (
        "summary.json",
        "metrics.csv",
        "plot.png",
        "ledger.json",
        "config.json",
        "checkpoint/state.json",
        "adapter/adapter_config.json",
        "deploy/superlink.db",
        "deploy/app/pyproject.toml",
    ):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert [r["round"] for r in summary["rounds"]] == [0, 1, 2] and summary["stop_reason"] is None
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["rounds"][1]["clients_trained"] == 2
    assert 0 < summary["composed_epsilon"] <= 8.0
    assert any("server saw only the evaluation split" in note for note in summary["notes"])
    assert len((out / "metrics.csv").read_text().strip().splitlines()) == 4
    assert "round 2:" in federation.log("server-resumed") and "final accuracy" in federation.log("server-resumed")


def test_a_restarted_server_resumes_and_counts_nothing_twice(federation: Federation) -> None:
    assert {"flower-superlin", "flwr-serverapp"} <= {n[:15] for n in federation.killed_server}
    assert federation.server_left_after_kill == []
    assert "already registered" in federation.log("server-resumed")  # the SuperLink's state survived the crash
    server = _ledger(federation.out / "ledger.json")
    alice = _ledger(federation.machine("alice") / "data" / "state" / "ledger.json")
    assert sorted(alice) == [("alice", 1), ("alice", 2)]
    assert {k: v for k, v in server.items() if k[0] == "alice"} == alice  # same events, each (client, round) once
    decisions = [
        json.loads(line)
        for line in (federation.machine("alice") / "data" / "state" / "events.jsonl").read_text().splitlines()
    ]
    trained = [d["round"] for d in decisions if d["decision"] == "trained"]
    assert sorted(trained) == [1, 2]  # trained each round exactly once; asked again, it re-sent
    assert "alice: paid for round(s) [1, 2]" in federation.log("alice") and federation.alice_rc == 130


def test_a_killed_client_keeps_its_spend_and_the_round_completes(federation: Federation) -> None:
    summary = json.loads((federation.out / "summary.json").read_text())
    assert summary["rounds"][2]["clients_trained"] == 1  # round 2 with alice alone
    server = _ledger(federation.out / "ledger.json")
    bob = _ledger(federation.machine("bob") / "data" / "state" / "ledger.json")
    assert ("bob", 1) in bob
    # the server counts only what bob sent it; bob's own ledger holds everything he spent
    server_bob = {k: v for k, v in server.items() if k[0] == "bob"}
    assert server_bob == {("bob", 1): bob[("bob", 1)]}
    assert all(bob[k] == v for k, v in server_bob.items())
    # the SuperLink reports bob's missing reply once his heartbeats stop; the round then completes with alice
    assert [r["round"] for r in summary["rejected_updates"] if "Node Unavailable" in str(r["reason"])] == [2]


def test_every_process_is_stopped(federation: Federation) -> None:
    assert federation.leftovers == []
