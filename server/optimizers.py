"""The server optimizer: one of Flower's strategies, chosen by name and wrapped by the ledger strategy.

fedtune does not re-implement server optimizers; it builds Flower's (``flwr.serverapp.strategy``):

========== ======================================================================================
fedavg     :math:`x_{t+1} = \\bar x_t` (McMahan et al. 2017): the example-weighted mean of the clients'
           models.
fedavgm    :math:`\\Delta_t = x_t - \\bar x_t`, :math:`v_t = \\mu v_{t-1} + \\Delta_t`,
           :math:`x_{t+1} = x_t - \\eta v_t` (Hsu et al. 2019, arXiv 1909.06335).
fedadam    :math:`\\Delta_t = \\bar x_t - x_t`, :math:`m_t = \\beta_1 m_{t-1} + (1-\\beta_1)\\Delta_t`,
           :math:`v_t = \\beta_2 v_{t-1} + (1-\\beta_2)\\Delta_t^2`,
           :math:`x_{t+1} = x_t + \\eta_t m_t / (\\sqrt{v_t} + \\tau)` with Flower's bias-corrected
           :math:`\\eta_t = \\eta \\sqrt{1-\\beta_2^{t+1}} / (1-\\beta_1^{t+1})`, ``t`` the server round
           (Reddi et al., "Adaptive Federated Optimization", ICLR 2021).
fedyogi    as FedAdam with :math:`v_t = v_{t-1} - (1-\\beta_2)\\Delta_t^2 \\operatorname{sign}(v_{t-1} - \\Delta_t^2)`,
           but with the plain :math:`\\eta` (Flower's FedYogi has no bias correction).
========== ======================================================================================

``server_learning_rate`` is :math:`\\eta`; ``server_momentum`` is FedAvgM's :math:`\\mu` and
FedAdam/FedYogi's :math:`\\beta_1`. FedAdam/FedYogi keep Flower's :math:`\\beta_2 = 0.99` and
:math:`\\tau = 10^{-3}`; all start from :math:`m_0 = v_0 = 0`. FedAvgM with :math:`\\mu = 0` and
:math:`\\eta = 1` is FedAvg. A centralized run (one client) always uses FedAvg. The server optimizer
only post-processes the clients' (privatized) updates, so it changes no privacy guarantee.

The optimizer's state between rounds (FedAvgM's momentum and its own copy of the model, FedAdam's
and FedYogi's moments) lives in Flower's strategy objects; :func:`strategy_state` copies it out for
the round checkpoint and :func:`load_strategy_state` puts it back on ``--resume``, so a resumed run
continues as the uninterrupted one would. FedAdam's :math:`\\eta_t` depends on the round number,
which a resumed run continues (:attr:`fedtune.server.run.ServerRun.next_round`).

Note: Flower's FedAdam returns float64 arrays (its :math:`\\eta_t` is a numpy float64), so with
it the global adapter travels and is checkpointed in float64; clients load it into their float32
parameters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedYogi, Strategy
from flwr.serverapp.strategy.fedopt import FedOpt

from fedtune.config import SERVER_OPTIMIZERS, RunConfig
from fedtune.server.scaffold import Scaffold
from fedtune.server.strategy import LedgerStrategy

__all__ = ["StrategyState", "make_strategy", "strategy_state", "load_strategy_state"]


def make_strategy(config: RunConfig, min_nodes: int) -> Strategy:
    """Flower's strategy for ``config.server_optimizer`` (train on every available node, no client evaluation)."""
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 0.0,
        "min_train_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    name = "fedavg" if config.centralized else config.server_optimizer  # one client: the mean is its model
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedavgm":
        return FedAvgM(
            **common, server_learning_rate=config.server_learning_rate, server_momentum=config.server_momentum
        )
    if name in ("fedadam", "fedyogi"):
        cls = FedAdam if name == "fedadam" else FedYogi
        return cls(
            **common, eta=config.server_learning_rate, eta_l=config.client_learning_rate, beta_1=config.server_momentum
        )
    raise ValueError(f"server_optimizer must be one of {', '.join(SERVER_OPTIMIZERS)}, got {name!r}")


#: One strategy's server-optimizer state: slot (a Flower attribute) -> array name -> array.
StrategyState = dict[str, dict[str, np.ndarray]]


def _slots(strategy: Strategy) -> tuple[str, ...]:
    """The attributes of Flower's ``strategy`` that carry state from one round to the next."""
    if isinstance(strategy, FedAvgM):
        # current_arrays: set by the first configure_train only, then replaced by each aggregation (the
        # strategy's own x_t, which need not be the arrays it is handed); momentum_vector: a list, in
        # current_arrays' key order
        return ("current_arrays", "momentum_vector")
    if isinstance(strategy, FedOpt):
        # current_arrays is reset by every configure_train (kept for completeness); m_t and v_t are the moments
        return ("current_arrays", "m_t", "v_t")
    return ()  # FedAvg keeps nothing between rounds


def _scaffold(strategy: Strategy) -> Scaffold | None:
    inner = strategy.inner if isinstance(strategy, LedgerStrategy) else strategy
    return inner if isinstance(inner, Scaffold) else None


def _unwrap(strategy: Strategy) -> Strategy:
    """Flower's strategy inside fedtune's wrappers (the ledger, SCAFFOLD)."""
    inner = strategy.inner if isinstance(strategy, LedgerStrategy) else strategy
    return inner.inner if isinstance(inner, Scaffold) else inner


def strategy_state(strategy: Strategy) -> StrategyState:
    """A copy of the server optimizer's state, for a checkpoint (``{}`` for FedAvg and before round 1).

    ``strategy`` is Flower's strategy or the :class:`~fedtune.server.strategy.LedgerStrategy`
    around it. FedAvgM: ``current_arrays`` and ``momentum_vector``; FedAdam/FedYogi:
    ``current_arrays``, ``m_t`` and ``v_t``; a slot still unset (None) is left out. Under SCAFFOLD
    also each client's control variate and example count (:meth:`~fedtune.server.scaffold.Scaffold.state`).
    Every slot maps array names to numpy arrays (copies, dtypes kept).
    """
    inner = _unwrap(strategy)
    state: StrategyState = {}
    for slot in _slots(inner):
        value = getattr(inner, slot, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            arrays = {key: array.numpy() for key, array in value.items()}
        elif slot == "momentum_vector":  # FedAvgM: a list ordered like its current_arrays
            keys = list(inner.current_arrays.keys())  # type: ignore[attr-defined]
            if len(keys) != len(value):
                raise ValueError(f"FedAvgM holds {len(value)} momentum arrays for {len(keys)} current arrays")
            arrays = dict(zip(keys, value, strict=True))
        else:
            arrays = dict(value)
        state[slot] = {key: np.array(array, copy=True) for key, array in arrays.items()}
    scaffold = _scaffold(strategy)
    if scaffold is not None:
        state.update(scaffold.state())
    return state


def load_strategy_state(strategy: Strategy, state: StrategyState) -> None:
    """Put :func:`strategy_state` back into a strategy of the same kind (resume, or undo a round).

    Every slot of the strategy is set: from ``state``, or to None (Flower's "not started") when
    ``state`` lacks it, so loading ``{}`` resets the server optimizer. Under SCAFFOLD the
    ``scaffold:`` slots restore the clients' control variates (:class:`~fedtune.server.scaffold.Scaffold`).

    Raises
    ------
    ValueError
        If ``state`` holds a slot this strategy does not have (it was saved by another server
        optimizer), or FedAvgM's momentum and current arrays name different arrays.
    """
    inner = _unwrap(strategy)
    slots = _slots(inner)
    scaffold = _scaffold(strategy)
    if scaffold is not None:
        scaffold.load_state({k: v for k, v in state.items() if Scaffold.owns(k)})
        state = {k: v for k, v in state.items() if not Scaffold.owns(k)}
    foreign = sorted(set(state) - set(slots))
    if foreign:
        raise ValueError(
            f"the saved server optimizer state holds {', '.join(map(repr, foreign))}, which "
            f"{type(inner).__name__} does not keep (was it saved with another server_optimizer?)"
        )
    copies = {slot: {k: np.array(v, copy=True) for k, v in state[slot].items()} for slot in slots if slot in state}
    if isinstance(inner, FedAvgM):
        current, momentum = copies.get("current_arrays"), copies.get("momentum_vector")
        if momentum is not None and (current is None or list(current) != list(momentum)):
            raise ValueError("FedAvgM's saved momentum does not name the same arrays, in order, as its current arrays")
        inner.current_arrays = None if current is None else ArrayRecord({k: Array(v) for k, v in current.items()})
        inner.momentum_vector = None if momentum is None else list(momentum.values())
        return
    for slot in slots:
        setattr(inner, slot, copies.get(slot))
