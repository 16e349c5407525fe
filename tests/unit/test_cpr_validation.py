"""CPR on exact-answer toys (2-D Gaussians / mixtures with closed-form denoisers).

Tolerances are the ones stated in docs/cpr.md; the full-size figures come from
``python -m compartments validate cpr``. Sizes here are cut to keep the tier CPU-cheap.
"""

from __future__ import annotations

import pytest
import torch

from compartments.validation import cpr_toy as toy

N, STEPS = 6000, 60


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def test_closed_form_denoiser_is_tweedie() -> None:
    # D = x + sigma^2 grad log p_sigma(x): check against autograd of the closed-form log density
    mix = toy.Mixture.isotropic([[1.0, 0.0], [-1.0, 2.0]], 0.4)
    x = torch.randn(5, 2, dtype=toy.DT, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    (grad,) = torch.autograd.grad(mix.log_prob(x, 0.7).sum(), x)
    torch.testing.assert_close(mix.denoise(x.detach(), 0.7), x.detach() + 0.49 * grad)


@pytest.mark.parametrize("method", ["euler", "euler_ancestral"])
def test_kl_equal_covariance_hits_the_geometric_target(method: str) -> None:
    cov = [[1.0, 0.3], [0.3, 0.5]]
    pub, priv = toy.Mixture.gaussian([0.0, 0.0], cov), toy.Mixture.gaussian([3.0, -1.0], cov)
    sig = toy.karras_sigmas(100)
    tm, tc = toy.geometric_target(pub, priv, 0.5)
    em, ec = toy.exact_discrete_law(pub, priv, 0.5, sig, method)
    x = toy.sample(toy.kl_denoiser(pub, priv, 0.5), N, sig, torch.Generator().manual_seed(0), method)
    m, c = toy.moments(x)
    # Monte Carlo vs the sampler's exact law: only sampling error (4 standard errors)
    assert (m - em).abs().max() < 4 * (torch.diagonal(ec).max().sqrt() / N**0.5)
    assert (c - ec).abs().max() < 0.05
    # exact law vs the geometric target: the geometric mix is exact here; what is left is the
    # N(0, sigma_max^2) start and the step count (docs/cpr.md: <= 0.02 mean, <= 0.12 cov at 100 steps)
    assert (em - tm).abs().max() < 0.02
    assert (ec - tc).abs().max() < 0.12
    # and the sample itself lands on the target
    assert (m - tm).abs().max() < 0.05 and (c - tc).abs().max() < 0.15


def test_kl_unequal_covariance_matches_its_exact_law_and_reports_the_gap() -> None:
    pub, priv = toy.Mixture.gaussian([0.0, 0.0], 1.0), toy.Mixture.gaussian([4.0, 0.0], 0.09)
    sig = toy.karras_sigmas(STEPS)
    em, ec = toy.exact_discrete_law(pub, priv, 0.5, sig, "euler")
    om, _ = toy.exact_ode_law(pub, priv, 0.5, steps=1000)
    tm, _ = toy.geometric_target(pub, priv, 0.5)
    x = toy.sample(toy.kl_denoiser(pub, priv, 0.5), N, sig, torch.Generator().manual_seed(0), "euler")
    m, c = toy.moments(x)
    assert (m - em).abs().max() < 0.03 and (c - ec).abs().max() < 0.03
    assert abs(float(om[0]) - 2.74) < 0.01  # docs/design.md's measured sampler mean
    assert abs(float(tm[0]) - 3.67) < 0.01  # ... and its geometric target: the gap is real
    assert abs(float(em[0]) - float(om[0])) < 0.05  # Euler at 60 steps is near the ODE limit


def test_choose_log_ratio_tracks_the_exact_one() -> None:
    rows = {(r["case"], r["laplacian"], r["sampler"]): r for r in toy.choose_tracking(n=1500, steps=STEPS)}
    for method in ("euler", "euler_ancestral"):
        eq = rows[("equal_cov", "none", method)]
        assert eq["corr"] > 0.99 and eq["mean_abs_err"] < 0.1
        ex = rows[("mixture", "exact", method)]
        assert ex["corr"] > 0.95 and ex["mean_abs_err"] < 0.3
        hu = rows[("mixture", "hutchinson", method)]
        assert hu["corr"] > 0.9 and hu["mean_abs_err"] < 0.4


def test_choose_samples_fall_where_min_puts_mass() -> None:
    rows = toy.choose_min_mass(n=3000, steps=STEPS)
    for r in rows:
        # min(p_pub, p_priv) for means -1.5 / +1.5 puts 91% of its mass in |x1| < 1; public alone 31%
        assert r["sample_mass_|x1|<1"] > 0.85
        assert r["public_only_mass_|x1|<1"] < 0.4
        assert abs(r["sample_mean"][0]) < 0.05


def test_cpr_keeps_samples_away_from_private_points() -> None:
    rows = toy.copy_protection(n=1500, steps=STEPS)
    for r in rows:
        assert r["retrieval_lambda0"] > 0.9  # plain retrieval copies
        assert r["cpr_kl_lambda0.5"] < 0.5 * r["retrieval_lambda0"]
        assert r["cpr_choose_lambda0.5_exact_laplacian"] < 0.4
        assert r["cpr_choose_lambda0.5_hutchinson"] < 0.4
    euler = next(r for r in rows if r["sampler"] == "euler")
    assert euler["cpr_kl_lambda0.5"] < 0.25 and euler["cpr_choose_lambda0.5_hutchinson"] < 0.05
