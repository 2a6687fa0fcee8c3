"""Settings that only a networked deployment has, and how they travel.

Server side (Flower ``run_config``, next to the :class:`~fedtune.config.RunConfig` keys):

``deployed``
    True when ``fedtune server`` submitted the run (the ServerApp then evaluates on the eval split
    only and never loads client training data).
``min-clients``
    Valid updates a round needs to count (0: all ``clients``).
``round-retries``
    How often a round that fell short of ``min-clients`` is tried again before the run stops.
``round-timeout``, ``wait-timeout``
    Seconds to wait for the replies of a round, and for enough clients to be connected.
``noise-multiplier``
    0: every client calibrates its own noise for its own budget (the default). A positive value
    asks every client to train with this sigma; a client whose budget it would exceed refuses.
``resume``
    Continue from ``OUT/checkpoint``.
``run-key``
    Names the federated run (``fedtune server`` draws one at the start and keeps it on ``--resume``).
    A client's state folder serves one run: asked by another run, the client refuses rather than
    mix the two runs' rounds in one ledger.

Client side (Flower ``node_config``, set by ``fedtune client`` on the client's machine and never
sent to the server): ``data-path``, ``state-dir``, ``client-id``, ``epsilon``, ``delta``,
``accountant``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fedtune.config import RunConfig

__all__ = ["DeployOptions", "NodeSettings", "split_run_config", "configure_logging", "DATA_PATH_KEY"]

_RUN_KEY = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")

#: node_config key that marks a SuperNode started by ``fedtune client``.
DATA_PATH_KEY = "data-path"


def configure_logging() -> None:
    """Show fedtune's INFO messages in a deployed app's output (Flower configures only its own logger).

    Only the ``fedtune`` logger gets a handler, and only when the root logger has none (so nothing is
    printed twice): the root logger stays quiet, so libraries (httpx ...) do not flood the SuperLink
    and SuperNode logs. Propagation is left on, so handlers installed by the host (pytest's log
    capture, an application's logging setup) still see fedtune's records.
    """
    logger = logging.getLogger("fedtune")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _non_negative_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _positive_seconds(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DeployOptions:
    """Deployment-only settings of a run (see the module docstring)."""

    deployed: bool = False
    min_clients: int = 0
    round_retries: int = 1
    round_timeout: float = 900.0
    wait_timeout: float = 300.0
    noise_multiplier: float = 0.0
    resume: bool = False
    run_key: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.run_key, str) or not _RUN_KEY.match(self.run_key):
            raise ValueError(f"run-key must be up to 64 letters, digits, '_', '.' or '-', got {self.run_key!r}")
        _non_negative_int("min-clients", self.min_clients)
        _non_negative_int("round-retries", self.round_retries)
        _positive_seconds("round-timeout", self.round_timeout)
        _positive_seconds("wait-timeout", self.wait_timeout)
        nm = self.noise_multiplier
        if isinstance(nm, bool) or not isinstance(nm, (int, float)) or not (math.isfinite(nm) and nm >= 0):
            raise ValueError(f"noise-multiplier must be a finite number >= 0 (0: each client calibrates), got {nm!r}")

    def quorum(self, clients: int) -> int:
        """Valid updates a round needs: ``min_clients``, or all ``clients`` when 0."""
        if self.min_clients > clients:
            raise ValueError(f"min-clients {self.min_clients} is larger than clients {clients}")
        return self.min_clients or clients

    def to_flower(self) -> dict[str, bool | int | float]:
        """Flat run_config entries (kebab-case)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


_OPTION_KEYS = {f.name.replace("_", "-"): f.name for f in fields(DeployOptions)}


def split_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, DeployOptions]:
    """Split Flower's run_config into the :class:`RunConfig` and the :class:`DeployOptions`.

    Raises
    ------
    ValueError
        Naming the offending setting (unknown key, wrong type, out of range).
    """
    run: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for key, value in dict(run_config).items():
        if key in _OPTION_KEYS:
            name = _OPTION_KEYS[key]
            if name in ("round_timeout", "wait_timeout", "noise_multiplier") and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            options[name] = value
        else:
            run[key] = value
    return RunConfig.from_flower(run), DeployOptions(**options)


@dataclass(frozen=True)
class NodeSettings:
    """A deployed client's own settings (from its SuperNode's node_config)."""

    data_path: Path
    state_dir: Path
    client_id: str
    epsilon: float
    delta: float
    accountant: str = "saddlepoint"

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> NodeSettings:
        """Read the settings ``fedtune client`` put into the node_config."""
        missing = [k for k in (DATA_PATH_KEY, "state-dir", "client-id", "epsilon", "delta") if k not in node_config]
        if missing:
            raise ValueError(f"the SuperNode's node-config lacks {', '.join(missing)} (start it with `fedtune client`)")
        return cls(
            data_path=Path(str(node_config[DATA_PATH_KEY])),
            state_dir=Path(str(node_config["state-dir"])),
            client_id=str(node_config["client-id"]),
            epsilon=float(node_config["epsilon"]),
            delta=float(node_config["delta"]),
            accountant=str(node_config.get("accountant", "saddlepoint")),
        )

    def to_toml(self) -> str:
        """The node config as a TOML document (``flower-supernode --node-config FILE.toml``).

        A file rather than ``key=value`` pairs: paths may hold spaces or quotes.
        """
        import tomli_w

        return tomli_w.dumps({DATA_PATH_KEY: str(self.data_path), "state-dir": str(self.state_dir), "client-id": self.client_id,
                              "epsilon": float(self.epsilon), "delta": float(self.delta), "accountant": self.accountant})
