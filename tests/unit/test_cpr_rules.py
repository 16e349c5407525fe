"""CPR-KL / CPR-Choose rules: exact algebra, lambda checks, state handling (no ComfyUI)."""

from __future__ import annotations

import math

import pytest
import torch

from compartments.samplers.cpr import (
    ChooseState,
    CPRInputError,
    check_lambda,
    choose_threshold,
    cpr_choose,
    cpr_kl,
    hutchinson_div_diff,
)


def _batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(3, 4, 8, 8, generator=g) for _ in range(4))


@pytest.mark.parametrize("lam", [-0.01, 1.01, float("nan"), "a"])
def test_lambda_outside_unit_interval_is_a_clear_error(lam: object) -> None:
    with pytest.raises(CPRInputError, match=r"\[0, 1\]"):
        check_lambda(lam)  # type: ignore[arg-type]
    pub, priv, neg, x = _batch()
    with pytest.raises(CPRInputError):
        cpr_kl(pub, priv, neg, lam)  # type: ignore[arg-type]
    with pytest.raises(CPRInputError):
        cpr_choose(pub, priv, neg, x, 1.0, lam, 1.0, ChooseState())  # type: ignore[arg-type]


def test_kl_is_the_lambda_mix_then_cfg() -> None:
    pub, priv, neg, _ = _batch()
    assert torch.equal(cpr_kl(pub, priv, neg, 1.0, 1.0), pub)
    assert torch.equal(cpr_kl(pub, priv, neg, 0.0, 1.0), priv)
    out = cpr_kl(pub, priv, neg, 0.3, 5.0)
    torch.testing.assert_close(out, neg + 5.0 * (0.3 * pub + 0.7 * priv - neg))
    assert torch.equal(cpr_kl(pub, priv, None, 0.3, 5.0), cpr_kl(pub, priv, None, 0.3, 1.0))


def test_kl_does_not_modify_inputs() -> None:
    pub, priv, neg, _ = _batch()
    copies = [t.clone() for t in (pub, priv, neg)]
    cpr_kl(pub, priv, neg, 0.5, 7.0)
    assert all(torch.equal(a, b) for a, b in zip((pub, priv, neg), copies, strict=True))


def test_choose_extremes_and_threshold() -> None:
    assert choose_threshold(0.5) == 0.0
    assert choose_threshold(1.0) == math.inf and choose_threshold(0.0) == -math.inf
    pub, priv, neg, x = _batch()
    for lam, want in ((1.0, pub), (0.0, priv)):
        st = ChooseState()
        for s in (10.0, 5.0, 1.0):
            d, choice, _ = cpr_choose(pub, priv, None, x, s, lam, 1.0, st)
            assert torch.equal(d, want)
            assert bool(choice.all()) == (lam == 0.0)
        assert len(st.choices) == 3 and len(st.sigmas) == 3


def test_choose_follows_the_less_likely_branch_per_sample() -> None:
    # 1-D toy: p_pub = N(-1, 1), p_priv = N(+1, 1) diffused; the exact log-ratio is linear in x.
    x0 = torch.tensor([[-2.0], [2.0]])
    st = ChooseState()
    sig = [2.0, 1.5, 1.0]
    for i, s in enumerate(sig):
        x = x0 * (1 + 0.1 * i)
        v = 1 + s * s
        d_pub = x - (s * s) * (x + 1) / v
        d_priv = x - (s * s) * (x - 1) / v
        d, choice, r = cpr_choose(d_pub, d_priv, None, x, s, 0.5, 1.0, st)
    exact = ((x - 1) ** 2 - (x + 1) ** 2).squeeze(1) / (2 * (1 + sig[-1] ** 2))
    # first point starts at r = 0, so compare the change since then
    x_first = x0
    exact_first = ((x_first - 1) ** 2 - (x_first + 1) ** 2).squeeze(1) / (2 * (1 + sig[0] ** 2))
    torch.testing.assert_close(r.float(), (exact - exact_first).float(), atol=0.05, rtol=0.05)
    # sample 0 sits near the public mean (p_pub larger) -> follows private; sample 1 -> public
    assert choice.tolist() == [True, False]
    audit = st.audit()
    assert audit["choices"][-1] == ["private", "public"] and len(audit["log_ratio"]) == 3


def test_hutchinson_matches_trace_for_linear_denoisers() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.diag(torch.rand(16, generator=g)), torch.diag(torch.rand(16, generator=g))
    x = torch.randn(2, 16, generator=g)
    v = torch.randint(0, 2, (2, 16), generator=g).float() * 2 - 1
    est = hutchinson_div_diff(x @ a, x @ b, (x + 1e-3 * v) @ a, (x + 1e-3 * v) @ b, v, 1e-3)
    torch.testing.assert_close(est, torch.full((2,), float(torch.trace(a - b)), dtype=torch.float64), atol=1e-3, rtol=1e-3)


def test_shape_mismatch_is_refused() -> None:
    pub, priv, _, x = _batch()
    with pytest.raises(CPRInputError):
        cpr_kl(pub, priv[:, :2])
    with pytest.raises(CPRInputError):
        cpr_choose(pub, priv, None, x[:2], 1.0, 0.5, 1.0, ChooseState())
