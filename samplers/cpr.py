"""CPR-KL and CPR-Choose: mixing a public and a private denoiser at every sampling step.

CPR (Golatkar et al., "CPR: Retrieval Augmented Generation for Copyright Protection",
arXiv 2403.18920) samples from a combination of a *public* (safe) distribution and a
*private* (retrieval-conditioned) one by merging the two denoisers inside one backward
pass. Where the paper's exact equations could not be read, this module implements the
project's documented rule (``docs/design.md``, section CPR):

Notation (k-diffusion / ComfyUI convention): ``x = x0 + sigma * eps``; a denoiser ``D(x, sigma)``
predicts ``x0``; its score is ``s(x, sigma) = (D - x) / sigma**2 = grad_x log p_sigma(x)``.

* **CPR-KL**: ``D = lam * D_pub + (1 - lam) * D_priv`` (a score mix; it targets
  ``p_pub**lam * p_priv**(1 - lam)``, exact where diffusion commutes with the geometric mix,
  e.g. Gaussians of equal covariance), then classifier-free guidance against ``D_neg``:
  ``D_neg + cfg * (D - D_neg)``.
* **CPR-Choose**: per sample and per step, follow the denoiser under which the current point
  is *less* likely (the score-space analogue of sampling ``min(p_pub, p_priv)``), weighted by
  ``lam``: follow public iff ``log p_pub - log lam < log p_priv - log(1 - lam)``, i.e. iff
  ``r < log(lam / (1 - lam))`` with ``r = log p_pub - log p_priv``. ``lam = 1`` is always
  public, ``lam = 0`` always private, ``lam = 0.5`` is the plain minimum; ties go public.

Log-ratio estimator (CPR-Choose). ``r(x, sigma)`` is a function on (x, sigma)-space, so its
change along any path is the line integral of its gradient. The sampler already has both
scores at every evaluated point, which give

* ``d r / d x = s_pub - s_priv``                                  (exact), and
* ``d r / d sigma = sigma * (|s_pub|^2 - |s_priv|^2) + sigma * (lap log p_pub - lap log p_priv)``
  (heat equation ``d_sigma p = sigma * lap p``).

(``lap log p = (div D - d) / sigma^2``). The Laplacian term needs the trace of the denoiser
Jacobian, i.e. extra model evaluations, so by default it is **omitted** (free: no extra
conds); it is exactly zero when both distributions have the same covariance structure
(same-shape Gaussians). Omitting it misses the normalisation of a *narrower* private law,
which matters for copy protection (see README.md, section "CPR"), so it can be included: exactly when the
caller knows ``div D`` (toys) or by a one-probe Hutchinson estimate (:func:`hutchinson_div_diff`,
two extra conds in the same batched call; the guider's ``laplacian_probe`` option). The
estimate starts at ``r = 0`` at the first evaluated point (at ``sigma_max`` both diffused
laws are nearly the same wide Gaussian) and accumulates trapezoid steps between successive
evaluations: ``r += <mean g, dx> + mean(h) * dsigma`` with ``g = s_pub - s_priv`` and
``h = sigma * (|s_pub|^2 - |s_priv|^2)``. Any order of evaluations works (Heun's corrector,
ancestral noise injections): the integral is path independent. ``validation/cpr_toy.py``
measures how well it tracks the exact ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import CompartmentsError


class CPRInputError(CompartmentsError):
    """Bad CPR parameters (raised before any sampling work happens)."""


def check_lambda(lam: float) -> float:
    """Return ``lam`` as float, refusing values outside [0, 1] (they are not a mixture)."""
    try:
        value = float(lam)
    except (TypeError, ValueError) as exc:
        raise CPRInputError(f"CPR lambda must be a number in [0, 1], got {lam!r}.") from exc
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise CPRInputError(
            f"CPR lambda must be in [0, 1] (1 = public model only, 0 = plain retrieval), got {value}.")
    return value


def _cfg(d: torch.Tensor, d_neg: torch.Tensor | None, cfg: float) -> torch.Tensor:
    if d_neg is None or cfg == 1.0:
        return d
    return d_neg + cfg * (d - d_neg)


def cpr_kl(d_pub: torch.Tensor, d_priv: torch.Tensor, d_neg: torch.Tensor | None = None,
           lam: float = 0.5, cfg: float = 1.0) -> torch.Tensor:
    """CPR-KL: ``D_neg + cfg * (lam * D_pub + (1 - lam) * D_priv - D_neg)``.

    Pure and state-free; ``x`` and ``sigma`` are not needed because the mix is linear in D.
    """
    lam = check_lambda(lam)
    if d_pub.shape != d_priv.shape:
        raise CPRInputError(f"D_pub {tuple(d_pub.shape)} and D_priv {tuple(d_priv.shape)} differ in shape.")
    d = lam * d_pub + (1.0 - lam) * d_priv  # exact at lam = 0 and lam = 1
    return _cfg(d, d_neg, cfg)


@dataclass
class ChooseState:
    """Per-sample CPR-Choose state carried across sampler steps (one row per batch sample).

    ``log_ratio`` is the running estimate of ``log p_pub - log p_priv`` at the last evaluated
    point; ``choices`` (True = private followed) and ``log_ratios`` hold one tensor per model
    evaluation, with the matching ``sigmas``, for the audit trail.
    """

    log_ratio: torch.Tensor | None = None
    prev_x: torch.Tensor | None = None
    prev_sigma: torch.Tensor | None = None
    prev_g: torch.Tensor | None = None
    prev_h: torch.Tensor | None = None
    choices: list[torch.Tensor] = field(default_factory=list)
    log_ratios: list[torch.Tensor] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]

    def record_constant(self, batch: int, private: bool, sigma: float) -> None:
        """Audit one evaluation at lambda = 0 or 1, where the choice is fixed and no log-ratio is estimated."""
        self.choices.append(torch.full((batch,), private, dtype=torch.bool))
        self.log_ratios.append(torch.full((batch,), math.nan, dtype=torch.float64))
        self.sigmas.append(sigma)

    def audit(self) -> dict:
        """JSON-ready record: per evaluation the sigma, per-sample choice and log-ratio."""
        return {
            "sigmas": [round(s, 6) for s in self.sigmas],
            "choices": [["private" if c else "public" for c in row.tolist()] for row in self.choices],
            "log_ratio": [[None if math.isnan(v) else round(float(v), 4) for v in row.tolist()]
                          for row in self.log_ratios],
            "private_fraction": (float(torch.stack(self.choices).float().mean()) if self.choices else None),
        }


def _per_sample_sigma(sigma: torch.Tensor | float, batch: int, like: torch.Tensor) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float64, device=like.device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise CPRInputError(f"sigma has {s.numel()} entries for a batch of {batch}.")
    return s


def choose_threshold(lam: float) -> float:
    """Follow public iff ``log p_pub - log p_priv < log(lam / (1 - lam))``."""
    lam = check_lambda(lam)
    if lam == 1.0:
        return math.inf
    if lam == 0.0:
        return -math.inf
    return math.log(lam) - math.log1p(-lam)


def hutchinson_div_diff(d_pub: torch.Tensor, d_priv: torch.Tensor, d_pub_probe: torch.Tensor,
                        d_priv_probe: torch.Tensor, v: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """One-probe estimate of ``div D_pub - div D_priv`` per sample, [B].

    ``d_*_probe`` are the denoisers evaluated at ``x + eps * v`` (v Rademacher): the finite
    difference gives ``J v`` and ``E[v^T J v] = tr J``. Costs two extra conds per step.
    """
    b = v.shape[0]
    diff = (d_pub_probe - d_pub) - (d_priv_probe - d_priv)
    eps_t = torch.as_tensor(eps, dtype=torch.float64, device=v.device).reshape(-1)
    return (v.reshape(b, -1).to(torch.float64) * diff.reshape(b, -1).to(torch.float64)).sum(1) / eps_t


def update_log_ratio(d_pub: torch.Tensor, d_priv: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor | float,
                     state: ChooseState, div_diff: torch.Tensor | None = None) -> torch.Tensor:
    """Advance the running log-ratio estimate to the point ``(x, sigma)``; returns it (shape [B]).

    ``div_diff`` (optional, [B]) is ``div D_pub - div D_priv`` at this point; with it the
    omitted Laplacian term ``(div D_pub - div D_priv) / sigma`` of ``d r / d sigma`` is included
    (exact in the toys, :func:`hutchinson_div_diff` in the guider when asked for).
    """
    b = x.shape[0]
    s = _per_sample_sigma(sigma, b, x)
    xf = x.detach().reshape(b, -1).to(torch.float64)
    s2 = (s * s).unsqueeze(1)
    sp = (d_pub.detach().reshape(b, -1).to(torch.float64) - xf) / s2
    sq = (d_priv.detach().reshape(b, -1).to(torch.float64) - xf) / s2
    g = sp - sq
    h = s * ((sp * sp).sum(1) - (sq * sq).sum(1))
    if div_diff is not None:
        h = h + div_diff.to(torch.float64).reshape(b) / s
    if state.log_ratio is None or state.prev_x is None or state.prev_x.shape != xf.shape:
        r = torch.zeros(b, dtype=torch.float64, device=x.device)
    else:
        dx = xf - state.prev_x
        ds = s - state.prev_sigma
        r = state.log_ratio + 0.5 * ((g + state.prev_g) * dx).sum(1) + 0.5 * (h + state.prev_h) * ds
    state.log_ratio, state.prev_x, state.prev_sigma, state.prev_g, state.prev_h = r, xf, s, g, h
    return r


def cpr_choose(d_pub: torch.Tensor, d_priv: torch.Tensor, d_neg: torch.Tensor | None, x: torch.Tensor,
               sigma: torch.Tensor | float, lam: float, cfg: float, state: ChooseState,
               div_diff: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPR-Choose for one model evaluation.

    Returns ``(D, choice, log_ratio)``: the guided denoised batch, a bool tensor [B]
    (True = private denoiser followed) and the running log-ratio estimate [B]. ``state`` is
    updated in place (and appended to its audit lists).
    """
    thr = choose_threshold(lam)
    if d_pub.shape != d_priv.shape or d_pub.shape != x.shape:
        raise CPRInputError(f"shapes differ: D_pub {tuple(d_pub.shape)}, D_priv {tuple(d_priv.shape)}, x {tuple(x.shape)}.")
    r = update_log_ratio(d_pub, d_priv, x, sigma, state, div_diff)
    private = r > thr  # ties (and lam = 1) go public; lam = 0 (thr = -inf) is always private
    d = torch.where(private.to(d_pub.device).reshape(-1, *([1] * (x.dim() - 1))), d_priv, d_pub)
    state.choices.append(private.cpu())
    state.log_ratios.append(r.cpu())
    state.sigmas.append(float(_per_sample_sigma(sigma, x.shape[0], x)[0]))
    return _cfg(d, d_neg, cfg), private, r
