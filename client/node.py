"""A deployed client's own settings: what ``fedtune client`` puts in its SuperNode's node_config.

These are set on the client's machine and never sent to the server: ``data-path``, ``state-dir``,
``client-id``, ``epsilon``, ``delta``, ``accountant``, ``require-secure-aggregation``. A SuperNode
whose node_config holds :data:`DATA_PATH_KEY` was started by ``fedtune client`` and trains on its own data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NodeSettings", "DATA_PATH_KEY"]

#: node_config key that marks a SuperNode started by ``fedtune client``.
DATA_PATH_KEY = "data-path"


@dataclass(frozen=True)
class NodeSettings:
    """A deployed client's own settings (from its SuperNode's node_config)."""

    data_path: Path
    state_dir: Path
    client_id: str
    epsilon: float
    delta: float
    accountant: str = "saddlepoint"
    #: Train only inside Flower's SecAgg+ (the server then sees only the sum of the updates): a
    #: plaintext round is refused with a reason (``fedtune client --require-secure-aggregation``).
    require_secure_aggregation: bool = False

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
            require_secure_aggregation=bool(node_config.get("require-secure-aggregation", False)),
        )

    def to_toml(self) -> str:
        """The node config as a TOML document (``flower-supernode --node-config FILE.toml``).

        A file rather than ``key=value`` pairs: paths may hold spaces or quotes.
        """
        import tomli_w

        return tomli_w.dumps(
            {
                DATA_PATH_KEY: str(self.data_path),
                "state-dir": str(self.state_dir),
                "client-id": self.client_id,
                "epsilon": float(self.epsilon),
                "delta": float(self.delta),
                "accountant": self.accountant,
                "require-secure-aggregation": bool(self.require_secure_aggregation),
            }
        )
