"""Secure aggregation deployed: ``fedtune server --secure-aggregation`` and two ``fedtune client`` processes
over TLS with SuperNode authentication, with client-level DP on, training all-MiniLM-L6-v2 on real SST-2
shards (80 examples each, 2 steps, 1 round: the protocol, not training, is under test).

alice starts with ``--require-secure-aggregation`` (she trains only inside SecAgg+), bob without. The run
must finish with both clients in every round: every SecAgg+ stage crossed the network, the server's
ledger holds both clients' record-level events and its own client-level releases, and the clients'
own ledgers agree with it. What the server can see in this mode is tested in-process
(tests/server/test_secure_aggregation.py); here the point is that the protocol works deployed.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from federation_kit import Federation, prepare

from fedtune.deployment import free_port
from fedtune.privacy.ledger import PrivacyLedger

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROUNDS = 1
RUN = [
    "--clients",
    "2",
    "--rounds",
    str(ROUNDS),
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
    "2",
    "--round-timeout",
    "150",
    "--wait-timeout",
    "120",
    "--secure-aggregation",
    "--client-level-epsilon",
    "10",
    "--update-clipping-norm",
    "0.01",
]


@pytest.fixture(scope="module")
def secure_federation(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("secure-federation")
    prepare(root, glue_dir)
    env = {**os.environ, "FEDTUNE_DATA_DIR": str(glue_dir), "PYTHONUNBUFFERED": "1"}
    fed = Federation(root, free_port(), env)
    started = time.monotonic()
    try:
        server = fed.start("server", *fed.server_args(RUN))
        fed.wait("the SuperLink", lambda: "SuperLink ready" in fed.log("server") or server.poll() is not None, 120)
        assert server.poll() is None, fed.log("server")
        alice = fed.start("alice", *fed.client_args("alice", **{"--require-secure-aggregation": ""}))
        bob = fed.start("bob", *fed.client_args("bob"))
        fed.server_rc = server.wait(timeout=600)
        for proc in (alice, bob):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        print(f"\nsecure federation: {time.monotonic() - started:.0f} s")
        yield fed
    finally:
        fed.stop_everything()


def _entries(path: Path) -> dict[tuple[str, int], dict[str, Any]]:
    return {(e["client_id"], e["round"]): e for e in PrivacyLedger.load(path).to_dict()["entries"]}


def test_the_secure_run_finishes_with_both_clients_in_every_round(secure_federation: Federation) -> None:
    fed = secure_federation
    assert fed.server_rc == 0, fed.log("server")[-4000:]
    summary = json.loads((fed.out / "summary.json").read_text())
    assert summary["secure_aggregation"], summary
    assert [r["round"] for r in summary["rounds"]] == list(range(ROUNDS + 1)) and summary["stop_reason"] is None
    assert all(r["clients_trained"] == 2 for r in summary["rounds"][1:]), summary["rounds"]
    assert 0 < summary["composed_epsilon"] <= 8.0 and 0.0 <= summary["final_accuracy"] <= 1.0
    for name in ("server", "alice", "bob"):
        assert "Traceback" not in fed.log(name), fed.log(name)[-3000:]


def test_alice_trained_only_inside_secagg_and_both_ledgers_agree(secure_federation: Federation) -> None:
    fed = secure_federation
    events = [
        json.loads(line) for line in (fed.machine("alice") / "data" / "state" / "events.jsonl").read_text().splitlines()
    ]
    assert [e["decision"] for e in events if "round" in e] == ["trained"] * ROUNDS, events
    server = _entries(fed.out / "ledger.json")
    for name in ("alice", "bob"):
        own = _entries(fed.machine(name) / "data" / "state" / "ledger.json")
        assert sorted(own) == [(name, r) for r in range(1, ROUNDS + 1)]
        assert {k: v for k, v in server.items() if k[0] == name} == own  # the same events, each once


def test_client_level_epsilon_is_certified_and_within_target(secure_federation: Federation) -> None:
    fed = secure_federation
    summary = json.loads((fed.out / "summary.json").read_text())
    ledger = PrivacyLedger.load(fed.out / "ledger.json")
    assert len(ledger.server_events()) == ROUNDS
    epsilon = summary["client_level_epsilon"]
    assert math.isfinite(epsilon) and 0 < epsilon <= 10.0 * (1 + 1e-9), summary
