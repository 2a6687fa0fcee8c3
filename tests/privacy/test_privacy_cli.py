"""``fedtune privacy epsilon|calibrate|ledger`` (fedtune.privacy.cli through fedtune.cli.main)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from fedtune.cli import main
from fedtune.privacy.accountants import available_accountants, get_accountant
from fedtune.privacy.calibration import calibrate_noise, certifier
from fedtune.privacy.events import SubsampledGaussianEvent as Event
from fedtune.privacy.ledger import PrivacyLedger

EPS_ARGS = ["privacy", "epsilon", "--q", "0.02", "--sigma", "1.5", "--steps", "300", "--delta", "1e-5"]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedtune: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


# -- epsilon ------------------------------------------------------------------------------------
def test_epsilon_json(capsys):
    code, out, err = run(capsys, *EPS_ARGS, "--accountants", "saddlepoint,edgeworth,pld", "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    assert (data["q"], data["sigma"], data["steps"], data["delta"]) == (0.02, 1.5, 300, 1e-5)
    rows = data["accountants"]
    assert [r["name"] for r in rows] == ["saddlepoint", "edgeworth", "pld"]
    for row in rows:
        assert set(row) == {"name", "epsilon", "kind", "seconds"}
        acc = get_accountant(row["name"])
        assert row["kind"] == acc.kind
        assert row["epsilon"] == acc.get_epsilon(Event(0.02, 1.5, 300), 1e-5)
        assert row["seconds"] >= 0


def test_epsilon_table(capsys):
    code, out, _ = run(capsys, *EPS_ARGS, "--accountants", "saddlepoint,edgeworth1")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "epsilon at delta = 1e-05 for q = 0.02, sigma = 1.5, steps = 300"
    assert lines[1].split() == ["accountant", "epsilon", "kind", "seconds"]
    eps = get_accountant("saddlepoint").get_epsilon(Event(0.02, 1.5, 300), 1e-5)
    assert lines[3].split()[:3] == ["saddlepoint", f"{eps:.4f}", "estimate"]
    assert lines[4].split()[0] == "edgeworth1"
    assert "upper-bound: a certified guarantee" in out


# -- calibrate ----------------------------------------------------------------------------------
def test_calibrate_json(capsys):
    code, out, err = run(
        capsys,
        "privacy",
        "calibrate",
        "--epsilon",
        "2",
        "--delta",
        "1e-5",
        "--q",
        "0.02",
        "--steps",
        "500",
        "--accountants",
        "saddlepoint,edgeworth",
        "--json",
    )
    assert code == 0 and err == ""
    data = json.loads(out)
    expected = calibrate_noise(2.0, 1e-5, 0.02, 500)
    assert data["sigma"] == expected.sigma and data["sigma_estimate"] == expected.sigma_estimate
    assert data["accountant"] == "saddlepoint"
    assert data["certified_epsilon"] <= 2.0
    assert certifier().get_epsilon(Event(0.02, data["sigma"], 500), 1e-5) <= 2.0
    per = data["per_accountant"]
    assert [p["name"] for p in per] == ["saddlepoint", "edgeworth"]
    for p in per:
        assert set(p) == {"name", "sigma", "certified_epsilon"}
        assert p["certified_epsilon"] == certifier().get_epsilon(Event(0.02, p["sigma"], 500), 1e-5)
    assert per[0]["sigma"] == expected.sigma_estimate


def test_calibrate_table_warns_about_an_understating_accountant(capsys):
    code, out, _ = run(
        capsys,
        "privacy",
        "calibrate",
        "--epsilon",
        "3",
        "--delta",
        "1e-5",
        "--q",
        "0.01",
        "--steps",
        "1000",
        "--accountants",
        "saddlepoint,edgeworth1",
    )
    assert code == 0
    assert out.splitlines()[0] == "noise multiplier for epsilon = 3, delta = 1e-05, q = 0.01, steps = 1000"
    assert "chosen: sigma = " in out and "meets the target" in out
    assert "warning: the sigma asked for by edgeworth1 does NOT meet the target under the certified bound" in out


# -- ledger -------------------------------------------------------------------------------------
@pytest.fixture
def ledger_path(tmp_path):
    led = PrivacyLedger(tmp_path / "ledger.json", 1e-5)
    led.record("alice", 0, Event(0.05, 1.5, 200), 4000)
    led.record("alice", 1, Event(0.05, 1.5, 200), 4000)
    led.record("bob", 0, Event(0.1, 2.5, 100), 1000)
    return led.path


def test_ledger_of_a_run_folder_reads_its_ledger_json(capsys, ledger_path):
    code, out, err = run(capsys, "privacy", "ledger", str(ledger_path.parent))
    assert code == 0 and err == ""
    assert out.splitlines()[0] == f"privacy ledger {ledger_path}: 2 clients, delta = 1e-05"


def test_ledger_table(capsys, ledger_path):
    code, out, _ = run(capsys, "privacy", "ledger", str(ledger_path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"privacy ledger {ledger_path}: 2 clients, delta = 1e-05"
    assert lines[1].split() == [
        "client",
        "rounds",
        "steps",
        "examples",
        "epsilon",
        "(saddlepoint)",
        "epsilon",
        "(certified)",
    ]
    led = PrivacyLedger.load(ledger_path)
    alice = lines[3].split()
    assert alice == [
        "alice",
        "2",
        "400",
        "4000",
        f"{led.epsilon('alice'):.4f}",
        f"{led.certified_epsilon('alice'):.4f}",
    ]
    assert lines[4].split()[0] == "bob"
    assert f"composed record-level epsilon (max over clients, certified): {led.composed_epsilon():.4f}" in out
    assert "client-level" not in out


def test_ledger_json_with_another_accountant_and_delta(capsys, ledger_path):
    led = PrivacyLedger.load(ledger_path)
    led.record_server_event(0, Event(0.1, 1.0, 1))
    code, out, _ = run(
        capsys, "privacy", "ledger", str(ledger_path), "--accountant", "edgeworth", "--delta", "1e-6", "--json"
    )
    assert code == 0
    data = json.loads(out)
    assert data["delta"] == 1e-6 and data["accountant"] == "edgeworth"
    led.delta = 1e-6
    assert [c["id"] for c in data["clients"]] == ["alice", "bob"]
    assert data["clients"][0]["epsilon"] == led.epsilon("alice", "edgeworth")
    assert data["clients"][0]["epsilon_certified"] == led.certified_epsilon("alice")
    assert data["composed_epsilon"] == led.composed_epsilon()
    assert data["client_level_epsilon"] == led.client_level_epsilon() > 0
    assert data["server_events"] == [{"round": 0, "sampling_rate": 0.1, "noise_multiplier": 1.0, "steps": 1}]
    # the table labels each guarantee with what it protects
    led.save()
    code, out, _ = run(capsys, "privacy", "ledger", str(ledger_path))
    assert "protects one training example" in out
    assert f"client-level epsilon (server noise over 1 rounds, certified): {led.client_level_epsilon():.4f}" in out
    assert "protects a client's whole contribution" in out


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["privacy", "epsilon", "--q", "1.5", "--sigma", "1", "--steps", "10", "--delta", "1e-5"], ["1.5", "(0, 1]"]),
        (
            ["privacy", "epsilon", "--q", "0.1", "--sigma", "1", "--steps", "10", "--delta", "2"],
            ["delta", "2.0", "(0, 1)"],
        ),
        (
            ["privacy", "epsilon", "--q", "0.1", "--sigma", "-1", "--steps", "10", "--delta", "1e-5"],
            ["-1.0", "(0, inf)"],
        ),
        (["privacy", "epsilon", "--q", "0.1", "--sigma", "1", "--steps", "0", "--delta", "1e-5"], ["steps", "got 0"]),
        (
            ["privacy", "calibrate", "--epsilon", "0", "--delta", "1e-5", "--q", "0.1", "--steps", "10"],
            ["epsilon", "got 0.0", "(0, inf]"],
        ),
        (
            [
                "privacy",
                "calibrate",
                "--epsilon",
                "1",
                "--delta",
                "1e-5",
                "--q",
                "0.1",
                "--steps",
                "10",
                "--accountant",
                "nope",
            ],
            ["'nope'", "available:", "saddlepoint", "pld"],
        ),
        (["privacy", "ledger", "/nonexistent/ledger.json"], ["no privacy ledger at /nonexistent/ledger.json"]),
        (["privacy", "ledger", "/"], ["/ is a folder without a ledger.json", "pass a ledger file or the --out folder"]),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, argv, fragments):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert_clean_error(err, *fragments)


def test_bad_ledger_file(capsys, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    code, _, err = run(capsys, "privacy", "ledger", str(path))
    assert code == 2
    assert_clean_error(err, str(path), "not valid JSON")


def test_unknown_accountant_in_list_exits_2_naming_it(capsys):
    code, _, err = run(capsys, *EPS_ARGS, "--accountants", "saddlepoint,nope")
    assert code == 2
    assert "nope" in err.splitlines()[-1] and "Traceback" not in err


def test_unknown_accountant_in_list_gets_the_one_line_error(capsys):
    code, out, err = run(capsys, *EPS_ARGS, "--accountants", "saddlepoint,nope")
    assert code == 2
    assert_clean_error(err, "'nope'", *available_accountants())


# -- the installed console script ---------------------------------------------------------------
def test_console_script_runs():
    exe = shutil.which("fedtune")
    assert exe is not None, "the fedtune console script is not installed (pip install -e .)"
    proc = subprocess.run(
        [exe, *EPS_ARGS, "--accountants", "saddlepoint", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)["accountants"]
    assert [r["name"] for r in rows] == ["saddlepoint"]
    assert rows[0]["epsilon"] == get_accountant("saddlepoint").get_epsilon(Event(0.02, 1.5, 300), 1e-5)


def test_ledger_table_counts_a_label_count_release_apart(capsys, tmp_path):
    led = PrivacyLedger(tmp_path / "ledger.json", 1e-5)
    led.record("carol", 0, Event(1.0, 20.0, 1), 500, kind="release")
    led.record("carol", 1, Event(0.05, 1.5, 30), 500)
    code, out, _ = run(capsys, "privacy", "ledger", str(led.path))
    assert code == 0
    row = next(line.split() for line in out.splitlines() if line.startswith("carol"))
    assert row[:4] == ["carol", "1", "30", "500"]  # rounds and steps trained; the epsilons compose the release too
    assert float(row[5]) == pytest.approx(led.certified_epsilon("carol"), abs=1e-4)
    assert "1 client(s) also released their label counts once (round 0, logit adjustment)" in out
