"""fedtune accountants behind Flower's PrivacyAccountant protocol (fedtune.privacy.flower_accountant)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("flwr")

from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg  # noqa: E402
from flwr.supercore.privacy_accounting import (  # noqa: E402
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    PrivacySpent,
    SamplingMethod,
)

from fedtune.privacy.accountants import UnsupportedEventError, get_accountant  # noqa: E402
from fedtune.privacy.calibration import certifier  # noqa: E402
from fedtune.privacy.events import SubsampledGaussianEvent as Event  # noqa: E402
from fedtune.privacy.flower_accountant import FlowerPrivacyAccountant  # noqa: E402

DELTA = 1e-5
POPULATION = 1000


def config(sampling=SamplingMethod.POISSON, relation=NeighboringRelation.ADD_OR_REMOVE_ONE, max_epsilon=None):
    return PrivacyConfig(
        target_delta=DELTA,
        population_size=POPULATION,
        neighboring_relation=relation,
        sampling_method=sampling,
        max_epsilon=max_epsilon,
    )


def test_compose_and_epsilon_match_our_accountant():
    acc = FlowerPrivacyAccountant(config(max_epsilon=10.0))
    assert acc.get_epsilon(DELTA) == 0.0 and acc.get_delta(1.0) == 0.0 and acc.num_releases == 0
    acc.compose(GaussianPrivacyEvent(noise_multiplier=1.2, sample_size=20, population_size=POPULATION), count=300)
    acc.compose(GaussianPrivacyEvent(noise_multiplier=1.5, sample_size=50, population_size=POPULATION), count=100)
    assert acc.num_releases == 400
    events = [Event(20 / POPULATION, 1.2, 300), Event(50 / POPULATION, 1.5, 100)]
    sp = get_accountant("saddlepoint")
    assert acc.get_epsilon(DELTA) == sp.get_epsilon(events, DELTA)
    assert acc.get_delta(2.0) == sp.get_delta(events, 2.0)
    spent = acc.get_privacy_spent()
    assert isinstance(spent, PrivacySpent)
    assert (spent.epsilon, spent.delta, spent.num_releases, spent.accounting_method) == (
        sp.get_epsilon(events, DELTA),
        DELTA,
        400,
        "saddlepoint",
    )
    assert acc.get_privacy_spent(1e-6).epsilon == sp.get_epsilon(events, 1e-6)


def test_other_reporting_accountant():
    acc = FlowerPrivacyAccountant(config(), accountant="edgeworth")
    acc.compose(GaussianPrivacyEvent(1.2, 20, POPULATION), count=300)
    assert acc.get_epsilon(DELTA) == get_accountant("edgeworth").get_epsilon(Event(0.02, 1.2, 300), DELTA)
    assert acc.get_privacy_spent().accounting_method == "edgeworth"


def test_would_exceed_uses_the_certified_bound():
    acc = FlowerPrivacyAccountant(config())
    acc.compose(GaussianPrivacyEvent(1.5, 20, POPULATION), count=400)
    planned = GaussianPrivacyEvent(1.5, 20, POPULATION)
    certified = certifier().get_epsilon([Event(0.02, 1.5, 400), Event(0.02, 1.5, 100)], DELTA)
    estimate = get_accountant("saddlepoint").get_epsilon([Event(0.02, 1.5, 500)], DELTA)
    assert certified != estimate
    # a limit between the estimate and the certified bound decides the question by the certified bound
    limit = (certified + estimate) / 2
    assert acc.would_exceed(planned, max_epsilon=limit, count=100) is (certified > limit)
    assert acc.would_exceed(planned, max_epsilon=certified * 1.001, count=100) is False
    assert acc.would_exceed(planned, max_epsilon=certified * 0.999, count=100) is True
    assert acc.num_releases == 400  # asking composes nothing
    with pytest.raises(ValueError, match="no epsilon limit"):
        acc.would_exceed(planned)
    assert FlowerPrivacyAccountant(config(max_epsilon=1e-3)).would_exceed(planned) is True


def test_state_dict_round_trip():
    acc = FlowerPrivacyAccountant(config())
    acc.compose(GaussianPrivacyEvent(1.2, 20, POPULATION), count=300)
    acc.compose(GaussianPrivacyEvent(1.5, 50, POPULATION))
    state = json.loads(json.dumps(acc.state_dict()))  # serializable
    assert state["accountant"] == "saddlepoint" and len(state["events"]) == 2
    other = FlowerPrivacyAccountant(config())
    other.load_state_dict(state)
    assert other.num_releases == 301
    assert other.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    with pytest.raises(ValueError, match="not a fedtune Flower accountant state"):
        other.load_state_dict({"schema": "other", "events": []})


def test_without_replacement_is_unsupported():
    with pytest.raises(UnsupportedEventError, match="without replacement"):
        FlowerPrivacyAccountant(config(SamplingMethod.WITHOUT_REPLACEMENT, NeighboringRelation.REPLACE_ONE))


def test_no_amplification_uses_q_equal_one():
    acc = FlowerPrivacyAccountant(config(SamplingMethod.NO_AMPLIFICATION))
    acc.compose(GaussianPrivacyEvent(8.0, 10, POPULATION), count=20)
    sp = get_accountant("saddlepoint")
    assert acc.get_epsilon(DELTA) == sp.get_epsilon(Event(1.0, 8.0, 20), DELTA)
    assert acc.get_epsilon(DELTA) > sp.get_epsilon(Event(10 / POPULATION, 8.0, 20), DELTA)


def test_bad_events_and_counts():
    acc = FlowerPrivacyAccountant(config())
    with pytest.raises(ValueError, match="population_size 500 differs from the configured 1000"):
        acc.compose(GaussianPrivacyEvent(1.0, 10, 500))
    with pytest.raises(TypeError, match="GaussianPrivacyEvent"):
        acc.compose(Event(0.1, 1.0, 1))  # type: ignore[arg-type]
    for count in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"count must be an integer >= 1, got {count}"):
            acc.compose(GaussianPrivacyEvent(1.0, 10, POPULATION), count=count)  # type: ignore[arg-type]
    assert acc.num_releases == 0
    acc.compose(GaussianPrivacyEvent(1.0, 10, POPULATION))
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 2"):
        acc.get_epsilon(2)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, inf\], got -1"):
        acc.get_delta(-1)


def test_bad_arguments_are_refused_before_any_release():
    acc = FlowerPrivacyAccountant(config())
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 2"):
        acc.get_epsilon(2)
    with pytest.raises(ValueError, match=r"epsilon must be in \[0, inf\], got -1"):
        acc.get_delta(-1)


def test_plugs_into_flower_dp_strategy():
    acc = FlowerPrivacyAccountant(config(SamplingMethod.NO_AMPLIFICATION, max_epsilon=5.0))
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=10, accountant=acc
    )
    assert strategy.accountant is acc
    assert strategy.privacy_spent() == PrivacySpent(
        epsilon=0.0, delta=DELTA, num_releases=0, accounting_method="saddlepoint"
    )
    acc.compose(GaussianPrivacyEvent(1.0, 10, POPULATION), count=3)
    assert strategy.privacy_spent().epsilon == get_accountant("saddlepoint").get_epsilon(Event(1.0, 1.0, 3), DELTA)


def test_flower_refuses_poisson_for_fixed_clipping():
    # Flower's own constraint (not fedtune's): server-side fixed clipping accounts without amplification
    acc = FlowerPrivacyAccountant(config(SamplingMethod.POISSON))
    with pytest.raises(ValueError, match="no-amplification"):
        DifferentialPrivacyServerSideFixedClipping(
            FedAvg(), noise_multiplier=1.0, clipping_norm=1.0, num_sampled_clients=10, accountant=acc
        )


def test_flower_budget_guard_uses_would_exceed():
    from flwr.serverapp.exception import PrivacyBudgetExhausted

    acc = FlowerPrivacyAccountant(config(SamplingMethod.NO_AMPLIFICATION, max_epsilon=3.0))
    strategy = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(), noise_multiplier=2.0, clipping_norm=1.0, num_sampled_clients=2, accountant=acc
    )
    messages = [object(), object()]
    assert strategy._prepare_accounting(1, messages) == messages  # within budget
    acc.compose(GaussianPrivacyEvent(2.0, 2, POPULATION), count=50)  # now far over 3.0
    with pytest.raises(PrivacyBudgetExhausted):
        strategy._prepare_accounting(2, messages)
