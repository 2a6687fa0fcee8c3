"""The privacy loss random variable machinery (fedtune.privacy.plrv), against independent integrals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate

from fedtune.privacy.plrv import SubsampledGaussianPLRV, plrv_for

SUBSAMPLED = [(0.05, 1.1), (0.01, 0.8), (0.2, 2.0), (0.5, 0.7)]


def log_r(x: float, q: float, sigma: float) -> float:
    """log of the likelihood ratio p(x)/q(x), written independently of the module."""
    u = math.log(q) + (2.0 * x - 1.0) / (2.0 * sigma**2)
    return u if q == 1.0 else float(np.logaddexp(math.log1p(-q), u))


def gauss(x: float, mean: float, sigma: float) -> float:
    return math.exp(-0.5 * ((x - mean) / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))


def quad(f, q: float, sigma: float, t: float = 0.0) -> float:
    lo = min(0.0, 1.0 + t) - 40.0 * sigma
    hi = max(0.0, 1.0 + t) + 40.0 * sigma
    points = sorted({0.0, 1.0, 1.0 + t, 0.5 + sigma**2 * math.log(1.0 / q)})
    points = [p for p in points if lo < p < hi]
    value, _ = integrate.quad(f, lo, hi, points=points, limit=500, epsabs=0.0, epsrel=1e-11)
    return value


def kl_p_q(q: float, sigma: float) -> float:
    """KL(P || Q) with P = (1-q) N(0, s^2) + q N(1, s^2), Q = N(0, s^2)."""
    p = lambda x: (1 - q) * gauss(x, 0.0, sigma) + q * gauss(x, 1.0, sigma)  # noqa: E731
    return quad(lambda x: p(x) * log_r(x, q, sigma), q, sigma)


def kl_q_p(q: float, sigma: float) -> float:
    return quad(lambda x: -gauss(x, 0.0, sigma) * log_r(x, q, sigma), q, sigma)


def cgf_by_quadrature(t: float, q: float, sigma: float) -> float:
    """K(t) = log E_Q[r^(1+t)], by adaptive quadrature."""
    return math.log(quad(lambda x: gauss(x, 0.0, sigma) * math.exp((1.0 + t) * log_r(x, q, sigma)), q, sigma, t))


class TestFullBatchGaussian:
    @pytest.mark.parametrize("sigma", [0.5, 0.8, 1.0, 3.0])
    def test_cgf_is_quadratic(self, sigma):
        mu2 = 1.0 / sigma**2
        plrv = SubsampledGaussianPLRV(1.0, sigma)
        for t in (-3.0, -1.5, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0, 5.0):
            k = plrv.cgf_derivatives(t)
            scale = mu2 * (1.0 + abs(t)) ** 2
            assert k[0] == pytest.approx(mu2 * t * (t + 1.0) / 2.0, abs=1e-12 * scale), t
            assert k[1] == pytest.approx(mu2 * (2.0 * t + 1.0) / 2.0, abs=1e-12 * scale), t
            assert k[2] == pytest.approx(mu2, rel=1e-12), t
            assert abs(k[3]) <= 1e-12 * scale and abs(k[4]) <= 1e-12 * scale, (t, k)


class TestSubsampledGaussian:
    @pytest.mark.parametrize("q, sigma", SUBSAMPLED)
    def test_total_mass_is_one_at_zero_and_minus_one(self, q, sigma):
        plrv = SubsampledGaussianPLRV(q, sigma)
        assert abs(plrv.cgf_derivatives(0.0)[0]) <= 1e-12  # log E_P[1]
        assert abs(plrv.cgf_derivatives(-1.0)[0]) <= 1e-12  # log E_Q[1]

    @pytest.mark.parametrize("q, sigma", SUBSAMPLED)
    def test_mean_loss_is_kl_divergence(self, q, sigma):
        plrv = SubsampledGaussianPLRV(q, sigma)
        kl_pq = kl_p_q(q, sigma)
        kl_qp = kl_q_p(q, sigma)
        assert kl_pq > 0 and kl_qp > 0
        assert plrv.cgf_derivatives(0.0)[1] == pytest.approx(kl_pq, rel=1e-8)
        assert plrv.cgf_derivatives(-1.0)[1] == pytest.approx(-kl_qp, rel=1e-8)

    @pytest.mark.parametrize("q, sigma", SUBSAMPLED)
    def test_cgf_matches_quadrature_at_integer_tilts(self, q, sigma):
        plrv = SubsampledGaussianPLRV(q, sigma)
        for t in (-3, -2, 1, 2, 3, 5):
            expected = cgf_by_quadrature(float(t), q, sigma)
            assert plrv.cgf_derivatives(float(t))[0] == pytest.approx(expected, rel=1e-9, abs=1e-14), t

    @pytest.mark.parametrize("q, sigma", SUBSAMPLED)
    def test_cgf_is_renyi_divergence_of_opacus(self, q, sigma):
        # K(t) = t D_{1+t}(P||Q), and Opacus' RDP of the subsampled Gaussian is exact at integer orders
        from opacus.accountants.analysis.rdp import compute_rdp

        plrv = SubsampledGaussianPLRV(q, sigma)
        orders = [2, 3, 4, 8]
        rdp = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders)
        for alpha, value in zip(orders, rdp):
            assert plrv.cgf_derivatives(alpha - 1.0)[0] / (alpha - 1.0) == pytest.approx(value, rel=1e-9), alpha

    @pytest.mark.parametrize("q, sigma", SUBSAMPLED[:2])
    def test_derivatives_are_consistent_with_finite_differences(self, q, sigma):
        plrv = SubsampledGaussianPLRV(q, sigma)
        h = 1e-3
        for t in (-1.0, -0.3, 0.0, 1.5):
            lo, mid, hi = (plrv.cgf_derivatives(t + d) for d in (-h, 0.0, h))
            for j in (1, 2, 3):
                fd = (hi[j - 1] - lo[j - 1]) / (2 * h)
                assert mid[j] == pytest.approx(fd, rel=1e-4, abs=1e-9), (t, j)

    @pytest.mark.parametrize("q, sigma", SUBSAMPLED)
    def test_cgf_is_convex(self, q, sigma):
        plrv = SubsampledGaussianPLRV(q, sigma)
        second = [plrv.cgf_derivatives(t)[2] for t in np.linspace(-3, 3, 7)]
        slopes = [plrv.cgf_derivatives(t)[1] for t in np.linspace(-3, 3, 7)]
        assert min(second) > 0
        assert all(a < b for a, b in zip(slopes, slopes[1:]))


def test_plrv_for_shares_instances_and_caches_cumulants():
    a = plrv_for(0.037, 1.234)
    assert plrv_for(0.037, 1.234) is a
    assert plrv_for(0.037, 1.235) is not a
    first = a.cumulants(0.0)
    assert a.cumulants(0.0) is first
    np.testing.assert_array_equal(first, a.cgf_derivatives(0.0))


def test_extreme_tilt_is_refused_with_a_clear_error():
    with pytest.raises(OverflowError, match=r"tilt t = -1e\+06 needs \d+ quadrature nodes for q = 0.005, sigma = 1.5"):
        SubsampledGaussianPLRV(0.005, 1.5).cgf_derivatives(-1e6)
