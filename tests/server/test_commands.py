"""``fedtune server`` and ``fedtune client`` check their input before starting anything: one clear line, exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.config import RunConfig
from fedtune.data.shards import write_shards
from fedtune.deployment import create_certificates, create_client_keys
from fedtune.protocol import DeployOptions, split_run_config
from fedtune.server.deploy import write_app


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory, glue_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("kit")
    create_certificates(root / "certs")
    create_client_keys(root / "keys", "alice")
    (root / "empty").mkdir()
    write_shards("sst2", 2, root / "shards", data_dir=str(glue_dir), seed=3, max_train_examples=160)
    return root


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("fedtune: error:") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"--superlink": "nohost"}, "--superlink 'nohost' must be HOST:PORT"),
        ({"--superlink": "h:99999"}, "must be HOST:PORT"),
        (
            {"--root-certificates": None, "--auth-key": None},
            "--root-certificates CA_CRT and --auth-key KEY are required",
        ),
        ({"--insecure": ""}, "--insecure cannot be combined with --root-certificates or --auth-key"),
        ({"--data": "{kit}/nowhere"}, "does not exist"),
        ({"--delta": "0.05"}, "--delta 0.05 must be below 1 / 80 examples"),
        ({"--root-certificates": "{kit}/keys/alice.pub"}, "not a readable PEM certificate"),
        ({"--auth-key": "{kit}/certs/ca.crt"}, "not a readable OpenSSH private key"),
        ({"--client-id": "a b"}, "name 'a b' is not allowed"),
        ({"--max-wait-time": "0"}, "--max-wait-time must be > 0"),
    ],
)
def test_client_input_errors(
    changes: dict[str, str | None], fragment: str, kit: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args: dict[str, str | None] = {
        "--superlink": "127.0.0.1:9092",
        "--data": f"{kit}/shards/client-0",
        "--epsilon": "8",
        "--root-certificates": f"{kit}/certs/ca.crt",
        "--auth-key": f"{kit}/keys/alice",
        "--state-dir": f"{kit}/state-x",
    }
    args.update({k: None if v is None else v.replace("{kit}", str(kit)) for k, v in changes.items()})
    argv = ["client"] + [x for k, v in args.items() if v is not None for x in ((k,) if v == "" else (k, v))]
    assert fragment in run(argv, capsys)


def test_a_state_folder_serves_one_client(kit: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = kit / "state-owned"
    state.mkdir()
    (state / "client.json").write_text(json.dumps({"client_id": "bob"}))
    argv = [
        "client",
        "--superlink",
        "127.0.0.1:9092",
        "--data",
        f"{kit}/shards/client-0",
        "--epsilon",
        "8",
        "--state-dir",
        str(state),
        "--root-certificates",
        f"{kit}/certs/ca.crt",
        "--auth-key",
        f"{kit}/keys/alice",
    ]
    assert "belongs to client 'bob', not 'client-0'" in run(argv, capsys)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--certs", "{kit}/empty"], "ca.crt, server.crt, server.key missing"),
        (["--client-keys", "{kit}/empty"], "no *.pub files"),
        (["--min-clients", "3"], "min-clients 3 is larger than clients 2"),
        (["--round-timeout", "0"], "round-timeout must be a number of seconds > 0"),
        (["--port", "70000"], "--port must be in [1, 65535]"),
        (["--host", "not a host"], "is neither an IP address nor a DNS name"),
        (["--task", "nope"], "unknown GLUE task 'nope'"),
        (["--max-grad-norm", "-1"], "max_grad_norm must be in (0, inf)"),
        (["--resume", "{kit}/empty"], "no run of `fedtune server` there"),
    ],
)
def test_server_input_errors(
    extra: list[str], fragment: str, kit: Path, tmp_path: Path, glue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [
        "server",
        "--out",
        str(tmp_path / "out"),
        "--data-dir",
        str(glue_dir),
        "--certs",
        f"{kit}/certs",
        "--client-keys",
        f"{kit}/keys",
    ]
    assert fragment in run([*base, *[e.replace("{kit}", str(kit)) for e in extra]], capsys)


def test_server_never_overwrites_a_run(
    kit: Path, tmp_path: Path, glue_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "out" / "checkpoint").mkdir(parents=True)
    (tmp_path / "out" / "checkpoint" / "state.json").write_text("{}")
    argv = [
        "server",
        "--out",
        str(tmp_path / "out"),
        "--data-dir",
        str(glue_dir),
        "--certs",
        f"{kit}/certs",
        "--client-keys",
        f"{kit}/keys",
    ]
    assert "already holds a run; pass --resume" in run(argv, capsys)


def test_the_flower_app_names_fedtune_and_carries_every_setting(tmp_path: Path) -> None:
    import tomli

    config, options = RunConfig(rounds=3, epsilon=float("inf"), out="/x"), DeployOptions(deployed=True, min_clients=1)
    document = tomli.loads(write_app(tmp_path, config, options).read_text())
    app = document["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "fedtune.server.app:app", "clientapp": "fedtune.client.app:app"}
    assert split_run_config(app["config"]) == (config, options)


@pytest.mark.slow
def test_stop_local_superlink_stops_only_that_superlink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The safe replacement for `pkill -f flower-superlink`: another SuperLink on the machine lives on."""
    import subprocess

    import psutil

    from fedtune.deployment import console_script, free_port, stop_tree, wait_for_port

    def superlink(name: str) -> tuple[subprocess.Popen[bytes], int]:
        port = free_port()
        command = [
            console_script("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--control-api-address",
            f"127.0.0.1:{free_port()}",
            "--database",
            ":flwr-in-memory:",
        ]
        env = {**os.environ, "FLWR_HOME": str(tmp_path / name)}
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        wait_for_port("127.0.0.1", port, timeout=60, process=proc, what=f"SuperLink {name}")
        return proc, port

    ours, our_port = superlink("local")
    other, _ = superlink("other")
    try:
        helpers = psutil.Process(ours.pid).children(recursive=True)
        assert main(["stop-local-superlink", "--port", str(our_port)]) == 0
        assert f"stopped the local SuperLink on 127.0.0.1:{our_port} (process {ours.pid})" in capsys.readouterr().out
        ours.wait(timeout=15)
        assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in helpers)
        assert other.poll() is None  # the other SuperLink is untouched
        assert main(["stop-local-superlink", "--port", str(our_port)]) == 0
        assert "no local SuperLink" in capsys.readouterr().out
    finally:
        for proc in (ours, other):
            if proc.poll() is None:
                stop_tree(proc.pid)
