"""The privacy ledger (fedtune.privacy.ledger): bookkeeping, budgets, and crash safety."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import fedtune.io
from fedtune.privacy.accountants import get_accountant
from fedtune.privacy.calibration import certifier
from fedtune.privacy.events import Composition
from fedtune.privacy.events import SubsampledGaussianEvent as Event
from fedtune.privacy.ledger import LEDGER_SCHEMA, RELEASE_ROUND, BudgetCheck, LedgerEntry, PrivacyLedger

DELTA = 1e-5
# sigma >= 1.5 keeps every pld query ~0.1 s
A = Event(0.05, 1.5, 200)
B = Event(0.02, 2.0, 400)
C = Event(0.1, 2.5, 100)


@pytest.fixture
def ledger(tmp_path) -> PrivacyLedger:
    led = PrivacyLedger(tmp_path / "ledger.json", DELTA)
    assert led.record("alice", 0, A, 4000)
    assert led.record("alice", 1, B, 4000)
    assert led.record("alice", 2, A, 4000)
    assert led.record("bob", 0, C, 1000)
    assert led.record("bob", 2, A, 1000)
    return led


def test_record_and_reload_give_identical_epsilons(ledger):
    again = PrivacyLedger.load(ledger.path)
    assert list(again) == list(ledger)
    assert again.clients == ["alice", "bob"] and again.rounds("alice") == [0, 1, 2] and again.rounds("bob") == [0, 2]
    assert (again.delta, again.budget, again.accountant) == (DELTA, math.inf, "saddlepoint")
    for client in ("alice", "bob"):
        assert again.epsilon(client) == ledger.epsilon(client)
        assert again.certified_epsilon(client) == ledger.certified_epsilon(client)
    assert again.composed_epsilon() == ledger.composed_epsilon()


def test_stored_form_holds_events_not_epsilons(ledger):
    data = json.loads(ledger.path.read_text())
    assert data["schema"] == LEDGER_SCHEMA and data["delta"] == DELTA and data["budget"] is None
    assert data["entries"][0] == {"client_id": "alice", "round": 0, "examples": 4000, **A.to_dict()}
    assert len(data["entries"]) == 5 and data["server_events"] == []
    assert "epsilon" not in json.dumps(data)


def test_a_release_is_stored_with_its_kind_and_reported_apart_from_the_rounds(tmp_path):
    """A one-off release (a client's label counts) composes like any entry; only its kind tells it apart,
    and a ledger without releases is stored exactly as before (no ``kind`` key)."""
    ledger = PrivacyLedger(tmp_path / "ledger.json", DELTA)
    release = Event(1.0, 20.0, 1)
    ledger.record("carol", RELEASE_ROUND, release, 500, kind="release")
    ledger.record("carol", 1, A, 500)
    data = json.loads(ledger.path.read_text())
    stored = {"client_id": "carol", "round": 0, "examples": 500, "kind": "release", **release.to_dict()}
    assert data["entries"][0] == stored
    assert "kind" not in data["entries"][1]
    again = PrivacyLedger.load(ledger.path)
    assert [e.kind for e in again] == ["release", "train"] and list(again) == list(ledger)
    assert again.composition("carol") == Composition((release, A))
    assert again.report()[0] | {"epsilon": 0, "epsilon_certified": 0} == {
        "id": "carol",
        "rounds": 1,
        "steps": A.steps,
        "releases": 1,
        "examples": 500,
        "epsilon": 0,
        "epsilon_certified": 0,
    }
    # the same key as training instead of a release is a different entry: refused
    with pytest.raises(ValueError, match="already recorded as release"):
        ledger.record("carol", RELEASE_ROUND, release, 500)
    with pytest.raises(ValueError, match="kind must be one of train, release, got 'publish'"):
        ledger.record("dave", 0, release, 500, kind="publish")


def test_no_temporary_files_are_left_behind(ledger):
    ledger.record("carol", 0, A, 10)
    assert sorted(p.name for p in ledger.path.parent.iterdir()) == ["ledger.json"]


def test_recording_twice_counts_once(ledger):
    before = (len(ledger), ledger.epsilon("alice"), ledger.certified_epsilon("alice"))
    mtime = ledger.path.stat().st_mtime_ns
    assert ledger.record("alice", 1, B, 4000) is False
    assert (len(ledger), ledger.epsilon("alice"), ledger.certified_epsilon("alice")) == before
    assert ledger.path.stat().st_mtime_ns == mtime  # not even rewritten


@pytest.mark.parametrize("event, examples", [(A, 4000), (B, 3999)])
def test_a_different_event_for_the_same_key_is_refused(ledger, event, examples):
    with pytest.raises(ValueError, match=r"client 'alice' round 1 is already recorded"):
        ledger.record("alice", 1, event, examples)
    assert PrivacyLedger.load(ledger.path).composition("alice").events == (A, B, A)


def test_client_epsilon_composes_all_its_rounds(ledger):
    sp = get_accountant("saddlepoint")
    alice = Composition((A, B, A))
    assert ledger.composition("alice") == alice
    assert ledger.epsilon("alice") == sp.get_epsilon(alice, DELTA)
    assert ledger.epsilon("alice") == sp.get_epsilon([A.repeated(2), B], DELTA)
    # the ledger certifies the grouped form (steps commute): the same bound up to floating-point rounding
    assert ledger.certified_epsilon("alice") == pytest.approx(certifier().get_epsilon(alice, DELTA), rel=1e-9)
    assert ledger.epsilon("alice", "rdp") == get_accountant("rdp").get_epsilon(alice, DELTA)
    # one round costs less than all of them
    assert ledger.epsilon("alice") > sp.get_epsilon(A.repeated(2), DELTA)
    assert ledger.epsilon("nobody") == 0.0 and ledger.composition("nobody") is None


def test_composed_epsilon_is_the_max_over_clients(ledger):
    certified = {c: ledger.certified_epsilon(c) for c in ledger.clients}
    estimate = {c: ledger.epsilon(c) for c in ledger.clients}
    assert certified["alice"] != certified["bob"]
    assert ledger.composed_epsilon() == max(certified.values())
    assert ledger.composed_epsilon(certified=False) == max(estimate.values())
    assert PrivacyLedger(None, DELTA).composed_epsilon() == 0.0


def test_report_rows(ledger):
    rows = {row["id"]: row for row in ledger.report()}
    assert rows["alice"]["rounds"] == 3 and rows["alice"]["steps"] == 800 and rows["alice"]["examples"] == 4000
    assert rows["bob"]["rounds"] == 2 and rows["bob"]["steps"] == 300 and rows["bob"]["examples"] == 1000
    assert rows["bob"]["epsilon"] == ledger.epsilon("bob")
    assert rows["bob"]["epsilon_certified"] == ledger.certified_epsilon("bob")
    assert ledger.report("edgeworth")[0]["epsilon"] == ledger.epsilon("alice", "edgeworth")


class TestBudgetCheck:
    def test_refuses_over_budget_with_a_reason(self, ledger):
        spent = ledger.certified_epsilon("alice")
        planned = Event(0.05, 1.0, 2000)
        answer = ledger.check("alice", planned, budget=spent + 0.5)
        assert isinstance(answer, BudgetCheck)
        assert not answer.allowed
        after = certifier().get_epsilon(ledger.composition("alice") + planned, DELTA)
        assert answer.epsilon_after == pytest.approx(after, rel=1e-9)  # the ledger groups equal (q, sigma) events first
        assert answer.epsilon_after > spent + 0.5 == answer.budget
        for text in (
            "'alice'",
            f"{spent:.4g}",
            "2000 steps",
            "q = 0.05",
            "sigma = 1",
            f"{after:.4g}",
            f"budget {spent + 0.5:g}",
        ):
            assert text in answer.reason, (text, answer.reason)

    def test_allows_within_budget(self, ledger):
        spent = ledger.certified_epsilon("alice")
        answer = ledger.check("alice", Event(0.05, 1.0, 10), budget=spent + 0.5)
        assert answer.allowed and answer.reason == ""
        assert spent < answer.epsilon_after <= spent + 0.5

    def test_uses_the_ledger_budget_and_new_clients(self, tmp_path):
        led = PrivacyLedger(tmp_path / "l.json", DELTA, budget=1.0)
        cheap = Event(0.01, 2.0, 10)
        assert led.check("new", cheap).allowed
        refused = led.check("new", Event(0.1, 0.8, 1000))
        assert not refused.allowed and refused.budget == 1.0 and "'new' has spent epsilon 0 " in refused.reason

    def test_no_budget_allows_everything_and_still_reports(self, ledger):
        planned = Event(0.2, 1.5, 300)
        answer = ledger.check("alice", planned)
        assert answer.allowed and answer.budget == math.inf and answer.reason == ""
        expected = certifier().get_epsilon(ledger.composition("alice") + planned, DELTA)
        assert answer.epsilon_after == pytest.approx(expected, rel=1e-12)

    def test_bad_budget(self, ledger):
        with pytest.raises(ValueError, match=r"epsilon must be in \(0, inf\], got -1"):
            ledger.check("alice", A, budget=-1)


class TestCrashSafety:
    def test_failed_replace_keeps_the_previous_version(self, ledger, monkeypatch):
        before = ledger.path.read_bytes()

        def boom(src, dst):
            raise OSError("disk full (simulated)")

        monkeypatch.setattr(fedtune.io.os, "replace", boom)
        with pytest.raises(OSError, match="simulated"):
            ledger.record("carol", 0, A, 10)
        monkeypatch.undo()
        assert ledger.path.read_bytes() == before
        assert "carol" not in ledger.clients  # the in-memory ledger rolled back too
        assert sorted(p.name for p in ledger.path.parent.iterdir()) == ["ledger.json"]
        reloaded = PrivacyLedger.load(ledger.path)
        assert len(reloaded) == 5 and reloaded.clients == ["alice", "bob"]
        # and recording works again afterwards
        assert ledger.record("carol", 0, A, 10) and len(PrivacyLedger.load(ledger.path)) == 6

    def test_sigkill_while_recording_never_corrupts_the_file(self, tmp_path):
        path = tmp_path / "ledger.json"
        script = textwrap.dedent(
            """
            import sys
            from fedtune.privacy.events import SubsampledGaussianEvent
            from fedtune.privacy.ledger import PrivacyLedger
            led = PrivacyLedger.open(sys.argv[1], 1e-5)
            start = len(led)
            i = 0
            while True:
                led.record(
                    f"client-{i % 7}", start + i, SubsampledGaussianEvent(0.01, 1.0 + (i % 5) / 10, 100 + i), 50 + i
                )
                if i == 0:
                    print("ready", flush=True)
                i += 1
            """
        )
        counts = []
        for delay in (0.3, 0.9):
            proc = subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
            try:
                assert proc.stdout.readline().strip() == "ready"
                time.sleep(delay)
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            assert proc.returncode == -signal.SIGKILL
            led = PrivacyLedger.load(path)  # parses and re-validates every entry
            counts.append(len(led))
            json.loads(path.read_text())
        assert 1 <= counts[0] < counts[1]  # the second run continued from what the first left

    def test_concurrent_records_are_all_kept(self, tmp_path):
        led = PrivacyLedger(tmp_path / "ledger.json", DELTA)

        def work(client: str) -> None:
            for r in range(10):
                led.record(client, r, A, 100)

        threads = [threading.Thread(target=work, args=(f"c{k}",)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(PrivacyLedger.load(led.path)) == 40


class TestLoading:
    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no privacy ledger at .*missing.json"):
            PrivacyLedger.load(tmp_path / "missing.json")

    def test_bad_json_names_the_file(self, tmp_path):
        path = tmp_path / "broken.json"
        path.write_text('{"schema": "fedtune.privacy-ledger/1", "entries": [')
        with pytest.raises(ValueError, match=r"broken.json is not valid JSON"):
            PrivacyLedger.load(path)

    @pytest.mark.parametrize("data", [[], {"schema": "something-else/1"}, {"delta": 1e-5, "entries": []}])
    def test_wrong_schema_names_the_file(self, tmp_path, data):
        path = tmp_path / "other.json"
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"other.json is not a fedtune privacy ledger"):
            PrivacyLedger.load(path)

    def test_entries_are_revalidated(self, ledger):
        data = json.loads(ledger.path.read_text())
        data["entries"][0]["sampling_rate"] = 1.5
        ledger.path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=r"sampling_rate q must be in \(0, 1\], got 1.5"):
            PrivacyLedger.load(ledger.path)
        del data["entries"][0]["sampling_rate"]
        ledger.path.write_text(json.dumps(data))
        with pytest.raises(ValueError, match="missing the field 'sampling_rate'"):
            PrivacyLedger.load(ledger.path)

    def test_open_creates_or_loads(self, tmp_path, ledger):
        fresh = PrivacyLedger.open(tmp_path / "sub" / "new.json", DELTA, budget=3.0)
        assert len(fresh) == 0 and fresh.budget == 3.0 and not fresh.path.exists()
        fresh.record("x", 0, A, 1)
        assert fresh.path.exists()  # parent folder created on first write
        existing = PrivacyLedger.open(ledger.path, 1e-6, budget=4.0)
        assert len(existing) == 5 and existing.delta == 1e-6 and existing.budget == 4.0

    def test_budget_round_trips(self, tmp_path):
        led = PrivacyLedger(tmp_path / "b.json", 1e-6, budget=2.5, accountant="edgeworth")
        led.record("x", 0, A, 1)
        again = PrivacyLedger.load(led.path)
        assert (again.delta, again.budget, again.accountant) == (1e-6, 2.5, "edgeworth")


class TestValidation:
    @pytest.mark.parametrize(
        "args, pattern",
        [
            (("", 0, A, 1), "client_id must be a non-empty string, got ''"),
            ((3, 0, A, 1), "client_id must be a non-empty string, got 3"),
            (("a", -1, A, 1), "round must be an integer >= 0, got -1"),
            (("a", 1.0, A, 1), "round must be an integer >= 0, got 1.0"),
            (("a", 0, A, 0), "examples must be an integer >= 1, got 0"),
        ],
    )
    def test_entry(self, args, pattern):
        with pytest.raises(ValueError, match=pattern):
            LedgerEntry(*args)

    @pytest.mark.parametrize(
        "kwargs, pattern",
        [
            (dict(delta=0.0), r"delta must be in \(0, 1\), got 0.0"),
            (dict(budget=0.0), r"epsilon must be in \(0, inf\], got 0.0"),
            (dict(accountant="nope"), "unknown accountant 'nope'"),
        ],
    )
    def test_ledger(self, kwargs, pattern):
        with pytest.raises(ValueError, match=pattern):
            PrivacyLedger(**(dict(path=None, delta=DELTA) | kwargs))

    def test_in_memory_ledger(self):
        led = PrivacyLedger(None, DELTA)
        assert led.record("a", 0, A, 1) and led.epsilon("a") > 0
        led.save()  # no-op


class TestClientLevel:
    def test_none_without_server_events(self, ledger):
        assert ledger.client_level_epsilon() is None

    def test_server_events_compose(self, ledger):
        server = Event(0.1, 1.1, 1)
        assert ledger.record_server_event(0, server)
        assert ledger.record_server_event(1, server)
        assert ledger.record_server_event(1, server) is False
        with pytest.raises(ValueError, match="round 1 already has server event"):
            ledger.record_server_event(1, Event(0.1, 1.2, 1))
        expected = certifier().get_epsilon(server.repeated(2), DELTA)
        assert ledger.client_level_epsilon() == pytest.approx(expected, rel=1e-12)
        again = PrivacyLedger.load(ledger.path)
        assert again.client_level_epsilon() == ledger.client_level_epsilon()
        # record-level numbers are untouched by server events
        assert again.composed_epsilon() == ledger.composed_epsilon()
