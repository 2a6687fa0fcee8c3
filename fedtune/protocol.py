"""The client-server message format: keys, statuses, the client's reply, and the run settings.

Both sides import this module and nothing else to talk to each other (as Flower keeps its DP keys in
one constants module). A ``train`` message and its reply are Flower ``RecordDict`` objects:

Server to client
    ``"arrays"`` (:data:`ARRAYS_KEY`): the global adapter and head weights (an ``ArrayRecord``);
    ``"config"`` (:data:`CONFIG_KEY`): ``{"server-round": int}``;
    ``"scaffold-control"`` (:data:`CONTROL_KEY`, only with ``scaffold``): the global control
    variate ``c``, an ``ArrayRecord`` with the same names and shapes as ``"arrays"``.
Client to server
    ``"privacy"`` (:data:`PRIVACY_KEY`): the client's :class:`ClientReply` (status, privacy event,
    budget spent) as a ``ConfigRecord``; ``"metrics"`` (:data:`METRICS_KEY`): a ``MetricRecord``
    with ``num-examples`` (Flower's FedAvg weights by it) and training measurements; ``"arrays"``:
    the update, absent from a refusal; with ``scaffold`` also ``"scaffold-control"``: the client's
    new control variate ``c_k`` (its mean privatized gradient of the round).

Under secure aggregation (``secure_aggregation``, Flower's SecAgg+) the update travels as Flower's
legacy ``FitIns``/``FitRes`` records, because that is what ``SecAggPlusWorkflow`` and
``secaggplus_mod`` exchange: the ``FitIns`` config carries ``server-round``, the arrays' names
(:data:`SECURE_KEYS_KEY`) and how the client weighs its update (:data:`SECURE_WEIGHT_KEY`); the
``FitRes`` carries the masked update, and its metrics carry the :class:`ClientReply` under
:data:`PRIVACY_PREFIX` (:func:`secure_metrics`, :func:`split_secure_metrics`), so the privacy event
reaches the server's ledger in the clear while the update does not.

The run settings travel in Flower's ``run_config``: the :class:`~fedtune.config.RunConfig` keys plus
the deployment options of :class:`DeployOptions` (:func:`split_run_config` separates them).

Compatibility: keys are only ever added. A reader treats a missing key as its default below
(``dp`` defaults to *True*, so an old client is never mistaken for a non-private one); unknown keys
are ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedtune.config import RunConfig
from fedtune.privacy.events import SubsampledGaussianEvent

__all__ = [
    "ARRAYS_KEY",
    "CONFIG_KEY",
    "CONTROL_KEY",
    "METRICS_KEY",
    "PRIVACY_KEY",
    "SERVER_ROUND_KEY",
    "PRIVACY_PREFIX",
    "SECURE_KEYS_KEY",
    "SECURE_WEIGHT_KEY",
    "WEIGHT_EXAMPLES",
    "WEIGHT_UNIFORM",
    "STATUS_OK",
    "STATUS_REFUSED",
    "ClientReply",
    "DeployOptions",
    "reply_message",
    "secure_metrics",
    "split_secure_metrics",
    "split_run_config",
    "to_record",
    "to_state",
    "train_content",
]

#: RecordDict key of the model weights (both directions).
ARRAYS_KEY = "arrays"
#: RecordDict key of SCAFFOLD's control variate (server to client: the global ``c``; client to
#: server: the client's ``c_k``), an ArrayRecord named and shaped like :data:`ARRAYS_KEY`.
CONTROL_KEY = "scaffold-control"
#: RecordDict key of the round configuration the server sends.
CONFIG_KEY = "config"
#: ConfigRecord key of the round number inside :data:`CONFIG_KEY`.
SERVER_ROUND_KEY = "server-round"
#: RecordDict key of the client's :class:`ClientReply`.
PRIVACY_KEY = "privacy"
#: RecordDict key of the client's metrics (``num-examples`` first).
METRICS_KEY = "metrics"
#: The client trained (or re-sent a round it had paid for).
STATUS_OK = "ok"
#: The client declined; :attr:`ClientReply.reason` says why.
STATUS_REFUSED = "refused"
_STATUSES = (STATUS_OK, STATUS_REFUSED)
#: Secure aggregation: ``FitIns`` config key of the arrays' names, newline-separated (legacy
#: ``Parameters`` are a list without names).
SECURE_KEYS_KEY = "array-keys"
#: Secure aggregation: ``FitIns`` config key of the FedAvg weight the client masks with its update.
SECURE_WEIGHT_KEY = "secure-weight"
#: ... its values: the client's example count (FedAvg), or 1 (client-level DP: equal weights).
WEIGHT_EXAMPLES = "examples"
WEIGHT_UNIFORM = "uniform"
#: Secure aggregation: prefix of the :class:`ClientReply` fields inside the legacy ``FitRes`` metrics.
PRIVACY_PREFIX = "privacy."


@dataclass(frozen=True)
class ClientReply:
    """What a client reports with its update: who it is, what it spent, and whether it trained.

    The privacy event of the round is ``SubsampledGaussianEvent(sampling_rate, noise_multiplier,
    steps)``: ``steps`` DP-SGD steps with Poisson rate ``q`` and noise ``sigma * C``. The server
    records it in its own ledger; with ``dp`` False the client trained without noise (a
    non-private run) and there is no event.

    Attributes
    ----------
    client_id : str
        Stable client name (a deployed client's ``--client-id``; a simulated client's partition).
    examples : int
        Size of the client's shard N (``q = min(1, B / N)``).
    status : str
        :data:`STATUS_OK` or :data:`STATUS_REFUSED`.
    dp : bool
        Whether the client trains with DP (default True: a reply that omits it is private).
    sampling_rate, noise_multiplier, steps
        The round's privacy event (``noise_multiplier`` 0 and no event when ``dp`` is False).
    reason : str
        Why the client refused (empty otherwise).
    resent : bool
        The round was already paid for and the stored update is sent again (no new spend).
    epsilon, epsilon_certified : float
        The client's own estimate and certified bound after the round (``inf`` without DP).
    release_noise_multiplier : float
        Noise multiplier of the client's one-off Gaussian release before its first round (its
        label counts, for logit adjustment; sensitivity 1), recorded in both ledgers as round 0,
        the event ``SubsampledGaussianEvent(1, sigma_h, 1)``. 0 = no release. Sent with every
        reply, so a server that missed the first one still records it.
    """

    client_id: str
    examples: int
    status: str = STATUS_OK
    dp: bool = True
    sampling_rate: float = 0.0
    noise_multiplier: float = 0.0
    steps: int = 0
    reason: str = ""
    resent: bool = False
    epsilon: float = math.inf
    epsilon_certified: float = math.inf
    release_noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {self.status!r}")
        if isinstance(self.examples, bool) or not isinstance(self.examples, int) or self.examples < 0:
            raise ValueError(f"examples must be an integer >= 0, got {self.examples!r}")

    @property
    def release_event(self) -> SubsampledGaussianEvent | None:
        """The one-off release before the first round, as a privacy event (None without one)."""
        if not self.release_noise_multiplier:
            return None
        return SubsampledGaussianEvent(1.0, self.release_noise_multiplier, 1)

    @property
    def ok(self) -> bool:
        """The client trained (or re-sent a paid round)."""
        return self.status == STATUS_OK

    def to_config_record(self) -> ConfigRecord:
        """The reply as Flower's ``ConfigRecord`` (kebab-case keys; infinite epsilons omitted)."""
        data: dict[str, Any] = {
            "client-id": self.client_id,
            "examples": int(self.examples),
            "status": self.status,
            "dp": bool(self.dp),
            "sampling-rate": float(self.sampling_rate),
            "noise-multiplier": float(self.noise_multiplier),
            "steps": int(self.steps),
        }
        if self.reason:
            data["reason"] = self.reason
        if self.resent:
            data["resent"] = True
        if self.release_noise_multiplier:
            data["release-noise-multiplier"] = float(self.release_noise_multiplier)
        for key, value in (("epsilon", self.epsilon), ("epsilon-certified", self.epsilon_certified)):
            if math.isfinite(value):
                data[key] = float(value)
        return ConfigRecord(data)

    @classmethod
    def from_config_record(cls, record: Mapping[str, Any]) -> ClientReply:
        """Read a reply (missing keys take the defaults above).

        Raises
        ------
        ValueError
            If ``client-id`` is missing or a field has the wrong type or range.
        """
        if "client-id" not in record:
            raise ValueError("the reply's privacy record carries no client-id")
        try:
            return cls(
                client_id=str(record["client-id"]),
                examples=int(record.get("examples", 0)),
                status=str(record.get("status", STATUS_OK)),
                dp=bool(record.get("dp", True)),
                sampling_rate=float(record.get("sampling-rate", 0.0)),
                noise_multiplier=float(record.get("noise-multiplier", 0.0)),
                steps=int(record.get("steps", 0)),
                reason=str(record.get("reason", "")),
                resent=bool(record.get("resent", False)),
                epsilon=float(record.get("epsilon", math.inf)),
                epsilon_certified=float(record.get("epsilon-certified", math.inf)),
                release_noise_multiplier=float(record.get("release-noise-multiplier", 0.0)),
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed privacy record: {err}") from None


def train_content(arrays: ArrayRecord, server_round: int) -> RecordDict:
    """The content of a ``train`` message: the global weights and the round number."""
    return RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({SERVER_ROUND_KEY: int(server_round)})})


def reply_message(
    message: Message,
    reply: ClientReply,
    metrics: Mapping[str, float],
    update: Mapping[str, Any] | None = None,
    control: Mapping[str, Any] | None = None,
) -> Message:
    """The client's reply to ``message``: its :class:`ClientReply`, metrics, (unless refused) update
    and (SCAFFOLD) control variate."""
    content = RecordDict(
        {
            PRIVACY_KEY: reply.to_config_record(),
            METRICS_KEY: MetricRecord({"num-examples": reply.examples, **dict(metrics)}),
        }
    )
    if update is not None:
        content[ARRAYS_KEY] = to_record(update)
    if control is not None:
        content[CONTROL_KEY] = to_record(control)
    return Message(content, reply_to=message)


def secure_metrics(privacy: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """A legacy ``FitRes.metrics`` dict carrying the client's metrics and its :class:`ClientReply` record.

    SecAgg+ masks the ``FitRes`` parameters only; these metrics reach the server in the clear.
    """
    out: dict[str, bool | int | float | str] = {
        k: v for k, v in metrics.items() if isinstance(v, (bool, int, float, str)) and not k.startswith(PRIVACY_PREFIX)
    }
    out.update({PRIVACY_PREFIX + k: v for k, v in privacy.items()})
    return out


def split_secure_metrics(metrics: Mapping[str, Any]) -> tuple[ConfigRecord | None, dict[str, Any]]:
    """Inverse of :func:`secure_metrics`: the :class:`ClientReply` record (None if absent) and the other metrics."""
    privacy = {k[len(PRIVACY_PREFIX) :]: v for k, v in metrics.items() if k.startswith(PRIVACY_PREFIX)}
    rest = {k: v for k, v in metrics.items() if not k.startswith(PRIVACY_PREFIX)}
    return (ConfigRecord(privacy) if privacy else None), rest


def to_record(state: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord from a state dict of tensors or numpy arrays."""
    return ArrayRecord(
        {
            key: Array(np.ascontiguousarray(value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value))
            for key, value in state.items()
        }
    )


def to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A state dict of (writable, CPU) tensors from an ArrayRecord."""
    return {key: torch.from_numpy(np.array(record[key].numpy(), copy=True)) for key in record.keys()}


# -- run settings of a deployment ---------------------------------------------------------------

_RUN_KEY = re.compile(r"^[A-Za-z0-9_.-]{0,64}$")


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
    """Settings only a networked deployment has (Flower ``run_config`` keys, kebab-case).

    ``deployed``
        True when ``fedtune server`` submitted the run (the ServerApp then evaluates on the eval
        split only and never loads client training data).
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
        Names the federated run. A client's state folder serves one run: asked by another run, the
        client refuses rather than mix the two runs' rounds in one ledger.
    """

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

    def to_flower(self) -> dict[str, bool | int | float | str]:
        """Flat run_config entries (kebab-case)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}


_OPTION_KEYS = {f.name.replace("_", "-"): f.name for f in fields(DeployOptions)}
_FLOAT_OPTIONS = ("round_timeout", "wait_timeout", "noise_multiplier")


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
            if name in _FLOAT_OPTIONS and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            options[name] = value
        else:
            run[key] = value
    return RunConfig.from_flower(run), DeployOptions(**options)
