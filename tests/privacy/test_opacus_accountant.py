"""fedtune accountants inside Opacus (fedtune.privacy.opacus_accountant)."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")
opacus = pytest.importorskip("opacus")

from opacus.accountants import create_accountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402

from fedtune.privacy.accountants import get_accountant  # noqa: E402
from fedtune.privacy.calibration import calibrate_noise  # noqa: E402
from fedtune.privacy.events import Composition  # noqa: E402
from fedtune.privacy.events import SubsampledGaussianEvent as Event  # noqa: E402
from fedtune.privacy.opacus_accountant import (  # noqa: E402
    EdgeworthOpacusAccountant,
    FedtuneOpacusAccountant,
    PLDOpacusAccountant,
    SaddlePointOpacusAccountant,
    register_with_opacus,
)


@pytest.fixture
def registered():
    """Register with Opacus (global and idempotent, as in production)."""
    register_with_opacus()
    register_with_opacus()
    return {name: type(create_accountant(name)) for name in ("saddlepoint", "edgeworth", "pld", "rdp")}


def test_registration(registered):
    assert registered["saddlepoint"] is SaddlePointOpacusAccountant
    assert registered["edgeworth"] is EdgeworthOpacusAccountant
    assert registered["pld"] is PLDOpacusAccountant
    assert registered["rdp"].__module__.startswith("opacus")  # Opacus' own entries untouched
    acc = create_accountant("saddlepoint")
    assert isinstance(acc, FedtuneOpacusAccountant) and acc.mechanism() == "saddlepoint"


def test_get_noise_multiplier_matches_calibrate_noise(registered):
    sigma = get_noise_multiplier(
        target_epsilon=2.0,
        target_delta=1e-5,
        sample_rate=0.02,
        steps=500,
        accountant="saddlepoint",
        epsilon_tolerance=0.005,
    )
    estimate = calibrate_noise(2.0, 1e-5, 0.02, 500, certify=False).sigma
    assert sigma == pytest.approx(estimate, rel=0.01)
    assert sigma >= estimate  # Opacus returns the upper end of its bisection


def test_step_merges_equal_consecutive_steps():
    acc = SaddlePointOpacusAccountant()
    assert acc.get_epsilon(1e-5) == 0.0 and len(acc) == 0
    for _ in range(3):
        acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.step(noise_multiplier=1.3, sample_rate=0.01)
    acc.step(noise_multiplier=1.1, sample_rate=0.01)
    acc.step(noise_multiplier=1.1, sample_rate=0.01)
    assert acc.history == [(1.1, 0.01, 3), (1.3, 0.01, 1), (1.1, 0.01, 2)]
    assert len(acc) == 3
    assert acc.composition() == Composition((Event(0.01, 1.1, 3), Event(0.01, 1.3, 1), Event(0.01, 1.1, 2)))


def test_epsilon_is_the_fedtune_accountants(registered):
    for cls in (SaddlePointOpacusAccountant, EdgeworthOpacusAccountant, PLDOpacusAccountant):
        acc = cls()
        acc.history = [(1.5, 0.02, 100), (2.0, 0.05, 50)]
        comp = [Event(0.02, 1.5, 100), Event(0.05, 2.0, 50)]
        assert acc.get_epsilon(1e-5) == get_accountant(cls.fedtune_name).get_epsilon(comp, 1e-5)


def test_state_dict_round_trip():
    acc = SaddlePointOpacusAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=1.2, sample_rate=0.02)
    acc.step(noise_multiplier=0.9, sample_rate=0.02)
    state = acc.state_dict()
    assert state["mechanism"] == "saddlepoint" and state["history"] == [(1.2, 0.02, 5), (0.9, 0.02, 1)]
    other = SaddlePointOpacusAccountant()
    other.load_state_dict(state)
    assert other.history == acc.history
    assert other.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    state["history"].append((1.0, 0.5, 1))  # a deep copy: the accountant is unaffected
    assert acc.history == [(1.2, 0.02, 5), (0.9, 0.02, 1)]
    with pytest.raises(ValueError, match="cannot be loaded"):
        EdgeworthOpacusAccountant().load_state_dict(acc.state_dict())


def test_privacy_engine_reports_our_epsilon(registered):
    torch.manual_seed(0)
    n, dim = 200, 4
    data = torch.utils.data.TensorDataset(torch.randn(n, dim), torch.randint(0, 2, (n,)))
    loader = torch.utils.data.DataLoader(data, batch_size=10)
    model = torch.nn.Linear(dim, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off"
        engine = opacus.PrivacyEngine(accountant="saddlepoint")
        assert isinstance(engine.accountant, SaddlePointOpacusAccountant)
        model, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.3,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
        steps = 0
        while steps < 20:
            for x, y in loader:
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                steps += 1
                if steps == 20:
                    break
    assert engine.accountant.history == [(1.3, pytest.approx(10 / 200), 20)]
    eps = engine.get_epsilon(1e-5)
    expected = get_accountant("saddlepoint").get_epsilon(Event(10 / 200, 1.3, 20), 1e-5)
    assert eps == pytest.approx(expected, rel=1e-12)
    assert eps > 0
