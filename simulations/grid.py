"""The privacy-utility grid of ``fedtune compare``: which cells to run, and each cell's run settings.

A grid crosses *settings* (centralized, and federated under each partition) with privacy budgets
(epsilons, ``inf`` = no DP) and seeds. Every cell is an ordinary :class:`~fedtune.config.RunConfig`
derived from one base configuration by changing as little as possible:

* **Same model, LoRA, optimizer, learning rate, clipping norm C, batch size B, rounds R, seed** and
  the same training examples (the pooled set is exactly the union of the client shards).
* **Same compute (examples processed).** With ``epochs = E`` (the default, E = 1) each federated
  client takes ``ceil(E * N_k / (B * R))`` Poisson steps per round on its shard of ``N_k`` examples,
  and the centralized run ``ceil(E * N / (B * R))`` on the pooled ``N = sum_k N_k``: both process
  ``E * N`` expected examples over the run (up to rounding, at most one batch per client and
  round). ``local_epochs = E`` works the same way per round. With ``local_steps = S`` the centralized
  run takes ``K * S`` steps per round, the same ``K * S * B`` expected examples as ``K`` clients.
* **Same record-level guarantee.** Every record lives on exactly one client, so a client's
  ``(epsilon, delta)`` covers its records (parallel composition; docs/privacy.md) and a federated
  cell's guarantee is the maximum over clients. The centralized run calibrates its own noise to the
  same ``(epsilon, delta)`` over all of its steps. Both are calibrated and certified by the same
  accountants (estimate, then PLD upper bound).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from fedtune.config import RunConfig
from fedtune.data.partition import parse_partition_spec

__all__ = ["Cell", "GridSpec", "parse_epsilons", "parse_partitions", "parse_seeds"]

Setting = Literal["centralized", "federated"]


def _items(text: str | Iterable[Any]) -> list[str]:
    """The non-empty entries of a comma-separated string (or of an iterable)."""
    items = text.split(",") if isinstance(text, str) else [str(s) for s in text]
    return [s.strip() for s in items if s.strip()]


def parse_epsilons(text: str | Iterable[Any]) -> tuple[float, ...]:
    """Parse ``"1,3,8,inf"`` into sorted, distinct budgets.

    Raises
    ------
    ValueError
        An empty list, or an entry that is not a number > 0 (``inf`` allowed), naming the entry.
    """
    items = _items(text)
    if not items:
        raise ValueError("the epsilon list is empty; give budgets > 0 such as '1,3,8,inf' (inf = no DP)")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"epsilon {item!r} is not a number; allowed: numbers > 0 or 'inf'") from None
        if math.isnan(value) or value <= 0:
            raise ValueError(f"epsilon {item!r} is not allowed; every epsilon must be > 0 (or 'inf' for no DP)")
        values.append(value)
    return tuple(sorted(set(values)))


def parse_partitions(text: str | Iterable[str]) -> tuple[str, ...]:
    """Parse ``"iid,dirichlet:0.5"`` into canonical partition specs (``iid``, ``dirichlet:0.5``).

    Raises
    ------
    ValueError
        An empty list or an unknown spec (the message names it and the allowed forms).
    """
    items = _items(text)
    if not items:
        raise ValueError("the partition list is empty; give e.g. 'iid,dirichlet:0.5'")
    specs: list[str] = []
    for item in items:
        spec = str(parse_partition_spec(item))
        if spec not in specs:
            specs.append(spec)
    return tuple(specs)


def parse_seeds(text: str | Iterable[Any]) -> tuple[int, ...]:
    """Parse ``"0,1"`` into distinct seeds >= 0, in the given order."""
    items = _items(text)
    if not items:
        raise ValueError("the seed list is empty; give e.g. '0' or '0,1'")
    seeds: list[int] = []
    for item in items:
        try:
            seed = int(item)
        except ValueError:
            raise ValueError(f"seed {item!r} is not an integer; seeds are integers >= 0") from None
        if seed < 0:
            raise ValueError(f"seed {seed} is not allowed; seeds are integers >= 0")
        if seed not in seeds:
            seeds.append(seed)
    return tuple(seeds)


def _eps_label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


@dataclass(frozen=True)
class Cell:
    """One run of the grid.

    Parameters
    ----------
    setting : {"centralized", "federated"}
    partition : str
        Canonical partition spec of a federated cell; ``"pooled"`` for the centralized one.
    epsilon : float
        Record-level budget (``inf``: no DP).
    seed : int
    """

    setting: Setting
    partition: str
    epsilon: float
    seed: int

    @property
    def name(self) -> str:
        """Folder name, e.g. ``federated-dirichlet0.5-eps8-seed0``."""
        where = "centralized" if self.setting == "centralized" else f"federated-{self.partition.replace(':', '')}"
        return f"{where}-eps{_eps_label(self.epsilon)}-seed{self.seed}"

    @property
    def label(self) -> str:
        """The line a cell belongs to in the plots: ``centralized`` or ``federated iid``."""
        return "centralized" if self.setting == "centralized" else f"federated {self.partition}"


#: Settings a grid's cells must share or that a cell sets itself: never overridden per setting.
_NOT_OVERRIDABLE = ("task", "model", "data_dir", "clients", "partition", "epsilon", "delta", "seed", "out", "rounds")


def parse_overrides(items: Any) -> tuple[tuple[str, Any], ...]:
    """``KEY=VALUE`` strings or (key, value) pairs -> validated (name, typed value) pairs.

    Keys are RunConfig field names (``batch_size`` or ``batch-size``); values are converted to the
    field's type. Settings that define the comparison itself (task, data, clients, budget, rounds,
    seed) are refused with a ValueError naming them.
    """
    from dataclasses import fields as dc_fields

    known = {f.name: f for f in dc_fields(RunConfig)}
    defaults = RunConfig()
    pairs: list[tuple[str, Any]] = []
    for item in items or ():
        if isinstance(item, str):
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"expected KEY=VALUE, got {item!r}")
            value: Any = text
        else:
            key, value = item
        name = key.strip().replace("-", "_")
        if name not in known:
            raise ValueError(f"unknown setting {key!r} in KEY=VALUE; known: {', '.join(sorted(known))}")
        if name in _NOT_OVERRIDABLE:
            raise ValueError(f"{name} cannot differ between settings of a grid (fixed: {', '.join(_NOT_OVERRIDABLE)})")
        if isinstance(value, str):
            value = _typed(name, value, str(known[name].type))
        pairs.append((name, value))
    if pairs:
        defaults.replace(**dict(pairs))  # validates every value (ValueError naming it)
    return tuple(pairs)


def _typed(name: str, text: str, annotation: str) -> Any:
    """``text`` as the RunConfig field's type (its annotation, e.g. ``"float | None"``)."""
    optional = "None" in annotation
    if optional and text.strip().lower() in ("", "none"):
        return None
    try:
        if annotation.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if annotation.startswith("int"):
            return int(text)
        if annotation.startswith("float"):
            return float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a value of type {annotation}") from None
    return text


@dataclass(frozen=True)
class GridSpec:
    """A grid: the base run configuration crossed with settings, budgets and seeds.

    Parameters
    ----------
    base : RunConfig
        Shared settings (task, model, clients, rounds, batch size, LoRA, ...). Its ``epsilon``,
        ``partition`` and ``seed`` are replaced per cell; its ``out`` is ignored.
    epsilons : tuple of float
        Budgets; ``inf`` = the non-private baseline.
    partitions : tuple of str
        Federated partitions (``iid``, ``dirichlet:ALPHA``).
    seeds : tuple of int
        Seeds (data subset, partition, initialisation, sampling); empty = ``(base.seed,)``.
    centralized : bool
        Include the centralized cells.
    centralized_settings : tuple of (str, value) pairs
        Settings the centralized cells use instead of the base's (e.g. ``(("batch_size", 1024),
        ("learning_rate", 0.01))``): each setting tuned with the same effort gets its own best
        batch size, learning rate or optimizer. The compute stays matched: with ``local_steps`` the
        centralized steps are rescaled to the same examples (``ceil(K * S * B / B_central)``).
    """

    base: RunConfig
    epsilons: tuple[float, ...]
    partitions: tuple[str, ...]
    seeds: tuple[int, ...] = ()
    centralized: bool = True
    centralized_settings: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilons", parse_epsilons(self.epsilons))
        object.__setattr__(self, "partitions", parse_partitions(self.partitions) if self.partitions else ())
        object.__setattr__(self, "seeds", parse_seeds(self.seeds) if self.seeds else (self.base.seed,))
        object.__setattr__(self, "centralized_settings", parse_overrides(self.centralized_settings))
        if not self.partitions and not self.centralized:
            raise ValueError("the grid has no settings: give at least one partition or keep the centralized cells")
        if self.partitions and self.base.clients < 2:
            raise ValueError(f"federated cells need at least 2 clients, got clients = {self.base.clients}")

    def cells(self) -> list[Cell]:
        """Every cell, seed by seed; within a seed, setting by setting, budgets in increasing order."""
        settings: list[tuple[Setting, str]] = [("centralized", "pooled")] if self.centralized else []
        settings += [("federated", p) for p in self.partitions]
        return [Cell(s, p, e, seed) for seed in self.seeds for s, p in settings for e in self.epsilons]

    def config(self, cell: Cell, out: str | os.PathLike[str]) -> RunConfig:
        """The run configuration of ``cell`` (compute and privacy matched as the module docstring says)."""
        if cell.setting == "federated":
            return self.base.replace(partition=cell.partition, epsilon=cell.epsilon, seed=cell.seed, out=str(out))
        own = dict(self.centralized_settings)
        if "batch_size" in own and "sampling_rate" not in own:
            own["sampling_rate"] = None  # a centralized batch set for the cell wins over the clients' shared rate
        batch = int(own.get("batch_size", self.base.batch_size))
        steps = (
            None
            if self.base.local_steps is None
            else math.ceil(self.base.local_steps * self.base.clients * self.base.batch_size / batch)
        )
        cpus = self.base.cpus_per_client if self.base.gpus_per_client > 0 else float(max(1, os.cpu_count() or 1))
        return self.base.replace(
            **{
                "local_steps": steps,
                **own,
                "clients": 1,
                "client_level_epsilon": math.inf,  # one client: no client-level DP (a centralized cell is record-level)
                "clients_per_round": None,
                "partition": "iid",
                "epsilon": cell.epsilon,
                "seed": cell.seed,
                "cpus_per_client": max(cpus, self.base.cpus_per_client),
                "out": str(out),
            }
        )

    # -- serialisation (grid.json) --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "base": {k: v for k, v in self.base.to_dict().items() if k != "out"},
            "epsilons": [_eps_label(e) for e in self.epsilons],
            "partitions": list(self.partitions),
            "seeds": list(self.seeds),
            "centralized": self.centralized,
            "centralized_settings": dict(self.centralized_settings),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GridSpec:
        return cls(
            base=RunConfig.from_dict(data["base"]),
            epsilons=parse_epsilons(",".join(str(e) for e in data["epsilons"])),
            partitions=tuple(data["partitions"]),
            seeds=tuple(int(s) for s in data["seeds"]),
            centralized=bool(data.get("centralized", True)),
            centralized_settings=tuple(dict(data.get("centralized_settings", {})).items()),
        )
