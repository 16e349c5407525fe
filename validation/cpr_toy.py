"""Exact-answer toys for CPR: 2-D Gaussians and Gaussian mixtures with closed-form denoisers.

Why: a CPR rule is only trustworthy where we can say what it *should* sample. Here the public
and private distributions are Gaussians (or mixtures of Gaussians), so for every noise level
the diffused densities, their scores and the ideal denoisers are known in closed form. The
module runs the same sampler loops ComfyUI uses (k-diffusion's Euler and Euler-ancestral on
Karras sigmas, reimplemented here without ComfyUI) with the CPR rules of ``cpr.py`` and
provides the references the samples are judged against:

* ``geometric_target``: ``p_pub**lam * p_priv**(1 - lam)`` for two Gaussians (closed form);
* ``exact_discrete_law``: the exact law of the sampler itself when the mixed denoiser is affine
  in x (CPR-KL on Gaussians): every step is an affine map (plus Gaussian noise for ancestral),
  so mean and covariance propagate exactly;
* ``exact_ode_law``: the continuous probability-flow ODE's law, integrated with RK4 on 4k Karras-spaced
  steps (what Euler converges to with many steps);
* ``grid_stats``: moments of any 2-D density (the geometric mix of mixtures, ``min(p_pub, p_priv)``)
  by quadrature on a fine grid.

``python -m compartments validate cpr [--quick]`` prints one JSON line per figure; the
tests in ``tests/unit/test_cpr_validation.py`` assert the stated tolerances on the same runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..samplers.cpr import ChooseState, cpr_choose, cpr_kl, hutchinson_div_diff

DT = torch.float64
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]


@dataclass(frozen=True)
class Mixture:
    """A Gaussian mixture in d dims (a single Gaussian is a mixture of one)."""

    weights: torch.Tensor  # [K]
    means: torch.Tensor  # [K, d]
    covs: torch.Tensor  # [K, d, d]

    @staticmethod
    def gaussian(mean: list[float], cov: list[list[float]] | float) -> Mixture:
        m = torch.tensor(mean, dtype=DT)
        c = torch.as_tensor(cov, dtype=DT)
        if c.dim() == 0:
            c = c * torch.eye(len(mean), dtype=DT)
        return Mixture(torch.ones(1, dtype=DT), m[None], c[None])

    @staticmethod
    def isotropic(points: list[list[float]], std: float) -> Mixture:
        p = torch.tensor(points, dtype=DT)
        k, d = p.shape
        return Mixture(torch.full((k,), 1.0 / k, dtype=DT), p, (std**2) * torch.eye(d, dtype=DT).expand(k, d, d).clone())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def _diffused(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        cov = self.covs + (sigma**2) * torch.eye(self.dim, dtype=DT)
        return cov, torch.linalg.inv(cov)

    def component_logp(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """[N, K]: log(w_k N(x; mu_k, S_k + sigma^2 I))."""
        cov, prec = self._diffused(sigma)
        diff = x[:, None, :] - self.means[None]
        quad = torch.einsum("nki,kij,nkj->nk", diff, prec, diff)
        logdet = torch.logdet(cov)
        return torch.log(self.weights)[None] - 0.5 * (quad + logdet[None] + self.dim * math.log(2 * math.pi))

    def log_prob(self, x: torch.Tensor, sigma: float = 0.0) -> torch.Tensor:
        return torch.logsumexp(self.component_logp(x, sigma), dim=1)

    def denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """Ideal denoiser E[x0 | x_sigma = x] (Tweedie), in closed form."""
        _, prec = self._diffused(sigma)
        post = torch.softmax(self.component_logp(x, sigma), dim=1)  # [N, K]
        diff = x[:, None, :] - self.means[None]
        # D_k = mu_k + S_k (S_k + s^2)^-1 (x - mu_k)
        dk = self.means[None] + torch.einsum("kij,kjl,nkl->nki", self.covs, prec, diff)
        return (post[..., None] * dk).sum(1)

    def div_denoise(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """[N]: exact divergence (Jacobian trace) of the denoiser, by autograd (d is tiny)."""
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            d = self.denoise(xg, sigma)
            return sum(torch.autograd.grad(d[:, i].sum(), xg, retain_graph=i < self.dim - 1)[0][:, i]
                       for i in range(self.dim)).detach()

    def affine(self, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """For a single Gaussian: D(x) = A x + c (used by the exact-law propagation)."""
        if self.weights.numel() != 1:
            raise ValueError("only a single Gaussian has an affine denoiser")
        _, prec = self._diffused(sigma)
        a = self.covs[0] @ prec[0]
        return a, self.means[0] - a @ self.means[0]

    def sample(self, n: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        chol = torch.linalg.cholesky(self.covs)[idx]
        z = torch.randn(n, self.dim, generator=gen, dtype=DT)
        return self.means[idx] + torch.einsum("nij,nj->ni", chol, z)


# --- samplers (k-diffusion's Euler and Euler ancestral, same update rules as ComfyUI) -------
def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> list[float]:
    ramp = torch.linspace(0, 1, n, dtype=DT)
    s = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return s.tolist() + [0.0]


def ancestral_step(s_from: float, s_to: float, eta: float = 1.0) -> tuple[float, float]:
    if s_to == 0.0:
        return 0.0, 0.0
    up = min(s_to, eta * math.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2))
    return math.sqrt(s_to**2 - up**2), up


def sample(denoise: Denoiser, n: int, sigmas: list[float], gen: torch.Generator, method: str = "euler",
           dim: int = 2) -> torch.Tensor:
    """Run Euler ('euler') or Euler ancestral ('euler_ancestral') from N(0, sigma_max^2 I)."""
    x = torch.randn(n, dim, generator=gen, dtype=DT) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        d = (x - denoise(x, s)) / s
        if method == "euler":
            x = x + d * (s_next - s)
        elif method == "euler_ancestral":
            down, up = ancestral_step(s, s_next)
            x = x + d * (down - s)
            if s_next > 0:
                x = x + torch.randn(n, dim, generator=gen, dtype=DT) * up
        else:
            raise ValueError(f"unknown method {method!r}")
    return x


def kl_denoiser(pub: Mixture, priv: Mixture, lam: float) -> Denoiser:
    return lambda x, s: cpr_kl(pub.denoise(x, s), priv.denoise(x, s), None, lam)


def div_diff(pub: Mixture, priv: Mixture, x: torch.Tensor, s: float, laplacian: str,
             gen: torch.Generator | None = None) -> torch.Tensor | None:
    """div D_pub - div D_priv: None ('none'), exact ('exact') or one Hutchinson probe ('hutchinson')."""
    if laplacian == "none":
        return None
    if laplacian == "exact":
        return pub.div_denoise(x, s) - priv.div_denoise(x, s)
    v = torch.randint(0, 2, x.shape, generator=gen, dtype=torch.int64).to(DT) * 2 - 1
    eps = 1e-3 * max(s, 1e-2)
    xp = x + eps * v
    return hutchinson_div_diff(pub.denoise(x, s), priv.denoise(x, s), pub.denoise(xp, s), priv.denoise(xp, s), v, eps)


def choose_denoiser(pub: Mixture, priv: Mixture, lam: float, state: ChooseState, laplacian: str = "none",
                    last: dict | None = None) -> Denoiser:
    """CPR-Choose over closed-form denoisers; ``last`` (if given) keeps the last evaluated point."""
    gen = torch.Generator().manual_seed(1234)

    def den(x: torch.Tensor, s: float) -> torch.Tensor:
        if last is not None:
            last["x"], last["s"] = x.clone(), s
        dd = div_diff(pub, priv, x, s, laplacian, gen)
        return cpr_choose(pub.denoise(x, s), priv.denoise(x, s), None, x, s, lam, 1.0, state, dd)[0]

    return den


# --- exact references ---------------------------------------------------------------------
def geometric_target(pub: Mixture, priv: Mixture, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of p_pub^lam p_priv^(1-lam) / Z for two Gaussians (precision-weighted)."""
    pp, pq = torch.linalg.inv(pub.covs[0]), torch.linalg.inv(priv.covs[0])
    prec = lam * pp + (1 - lam) * pq
    cov = torch.linalg.inv(prec)
    return cov @ (lam * pp @ pub.means[0] + (1 - lam) * pq @ priv.means[0]), cov


def _mixed_affine(pub: Mixture, priv: Mixture, lam: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    a1, c1 = pub.affine(sigma)
    a2, c2 = priv.affine(sigma)
    return lam * a1 + (1 - lam) * a2, lam * c1 + (1 - lam) * c2


def exact_discrete_law(pub: Mixture, priv: Mixture, lam: float, sigmas: list[float],
                       method: str = "euler") -> tuple[torch.Tensor, torch.Tensor]:
    """Exact mean/cov of the CPR-KL sampler's output on Gaussians (each step is affine)."""
    d = pub.dim
    eye = torch.eye(d, dtype=DT)
    m, c = torch.zeros(d, dtype=DT), (sigmas[0] ** 2) * eye
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        a, b = _mixed_affine(pub, priv, lam, s)
        target, up = (s_next, 0.0) if method == "euler" else ancestral_step(s, s_next)
        h = (target - s) / s
        f = eye + h * (eye - a)  # x' = x + h (x - A x - b)
        m = f @ m - h * b
        c = f @ c @ f.T + (up**2) * eye
    return m, c


def exact_ode_law(pub: Mixture, priv: Mixture, lam: float, sigma_max: float = 80.0,
                  steps: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """Law of the continuous probability-flow ODE with the CPR-KL drift, RK4 from sigma_max to 0.

    dx/dsigma = sum_b w_b sigma (S_b + sigma^2)^-1 (x - mu_b), i.e. x' = M(sigma) x + v(sigma):
    mean' = M mean + v, cov' = M cov + cov M^T (no singularity at sigma = 0).
    """
    d = pub.dim
    eye = torch.eye(d, dtype=DT)

    def mv(s: float) -> tuple[torch.Tensor, torch.Tensor]:
        mm, vv = torch.zeros(d, d, dtype=DT), torch.zeros(d, dtype=DT)
        for w, g in ((lam, pub), (1 - lam, priv)):
            p = s * torch.linalg.inv(g.covs[0] + s * s * eye)
            mm, vv = mm + w * p, vv - w * p @ g.means[0]
        return mm, vv

    def f(s: float, m: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mm, vv = mv(s)
        return mm @ m + vv, mm @ c + c @ mm.T

    grid = karras_sigmas(steps, sigma_min=1e-6, sigma_max=sigma_max)
    m, c = torch.zeros(d, dtype=DT), (sigma_max**2) * eye
    for s, s_next in zip(grid[:-1], grid[1:], strict=True):
        h = s_next - s
        k1 = f(s, m, c)
        k2 = f(s + h / 2, m + h / 2 * k1[0], c + h / 2 * k1[1])
        k3 = f(s + h / 2, m + h / 2 * k2[0], c + h / 2 * k2[1])
        k4 = f(s_next, m + h * k3[0], c + h * k3[1])
        m = m + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        c = c + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return m, c


def grid_stats(logp: Callable[[torch.Tensor], torch.Tensor], lo: float = -8.0, hi: float = 8.0,
               n: int = 801) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised 2-D density on a grid: (points [M,2], probabilities [M], mean, cov)."""
    ax = torch.linspace(lo, hi, n, dtype=DT)
    pts = torch.cartesian_prod(ax, ax)
    lp = logp(pts)
    w = torch.softmax(lp, dim=0)
    mean = (w[:, None] * pts).sum(0)
    diff = pts - mean
    return pts, w, mean, (w[:, None, None] * diff[:, :, None] * diff[:, None, :]).sum(0)


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), torch.cov(x.T)


def copy_rate(x: torch.Tensor, points: torch.Tensor, radius: float) -> float:
    """Fraction of samples within ``radius`` of any private point (a 'copy')."""
    return float((torch.cdist(x, points).min(1).values < radius).double().mean())


# --- the validation runs ------------------------------------------------------------------
def _r(t: torch.Tensor) -> list[float]:
    return [round(float(v), 4) for v in t.reshape(-1)]


def _kl_laws(pub: Mixture, priv: Mixture, lam: float, sig: torch.Tensor, n: int, seed: int):
    """Per sampler: the geometric target, the ODE limit, the sampler's exact law and the samples' moments."""
    target, ode = geometric_target(pub, priv, lam), exact_ode_law(pub, priv, lam)
    for method in ("euler", "euler_ancestral"):
        exact = exact_discrete_law(pub, priv, lam, sig, method)
        x = sample(kl_denoiser(pub, priv, lam), n, sig, torch.Generator().manual_seed(seed), method)
        yield method, target, ode, exact, moments(x)


def kl_equal_covariance(n: int = 20000, steps: int = 200, seed: int = 0) -> list[dict]:
    """Equal covariances: the geometric mix is exact. MC moments vs the sampler's exact law
    (checks the implementation) and that law vs the geometric target (the remaining gap is the
    step count and the N(0, sigma_max^2) start, not CPR)."""
    cov = [[1.0, 0.3], [0.3, 0.5]]
    pub, priv = Mixture.gaussian([0.0, 0.0], cov), Mixture.gaussian([3.0, -1.0], cov)
    sig = karras_sigmas(steps)
    out = []
    for lam in (0.25, 0.5, 0.75):
        for method, (tm, tc), (om, oc), (em, ec), (m, c) in _kl_laws(pub, priv, lam, sig, n, seed):
            out.append({"figure": "kl_equal_cov", "lambda": lam, "sampler": method, "n": n, "steps": steps,
                        "target_mean": _r(tm), "sample_mean": _r(m),
                        "mc_vs_target_mean_err": round(float((m - tm).abs().max()), 4),
                        "mc_vs_target_cov_err": round(float((c - tc).abs().max()), 4),
                        "mc_vs_exact_mean_err": round(float((m - em).abs().max()), 4),
                        "mc_vs_exact_cov_err": round(float((c - ec).abs().max()), 4),
                        "exact_vs_target_mean_err": round(float((em - tm).abs().max()), 4),
                        "exact_vs_target_cov_err": round(float((ec - tc).abs().max()), 4),
                        "ode_limit_vs_target_mean_err": round(float((om - tm).abs().max()), 4),
                        "ode_limit_vs_target_cov_err": round(float((oc - tc).abs().max()), 4)})
    return out


def kl_unequal_covariance(n: int = 20000, steps: int = 60, seed: int = 0) -> list[dict]:
    """Stds 1 and 0.3, means 0 and 4 (docs/design.md's example): sampler law vs geometric target."""
    pub, priv = Mixture.gaussian([0.0, 0.0], 1.0), Mixture.gaussian([4.0, 0.0], 0.09)
    sig = karras_sigmas(steps)
    out = []
    for lam in (0.5,):
        for method, (tm, tc), (om, oc), (em, ec), (m, c) in _kl_laws(pub, priv, lam, sig, n, seed):
            out.append({"figure": "kl_unequal_cov", "lambda": lam, "sampler": method, "n": n, "steps": steps,
                        "sample_mean": _r(m), "sample_var": _r(torch.diagonal(c)),
                        "exact_sampler_mean": _r(em), "exact_sampler_var": _r(torch.diagonal(ec)),
                        "mc_vs_exact_mean_err": round(float((m - em).abs().max()), 4),
                        "mc_vs_exact_cov_err": round(float((c - ec).abs().max()), 4),
                        "ode_limit_mean": _r(om), "ode_limit_var": _r(torch.diagonal(oc)),
                        "geometric_target_mean": _r(tm), "geometric_target_var": _r(torch.diagonal(tc)),
                        "gap_to_target_mean": round(float((em - tm).abs().max()), 4)})
    return out


def kl_mixture(n: int = 20000, steps: int = 60, seed: int = 0) -> list[dict]:
    """Public Gaussian vs private 3-point mixture: sampler moments vs the grid geometric target."""
    pub = Mixture.gaussian([0.0, 0.0], 2.0)
    priv = Mixture.isotropic([[2.0, 2.0], [-2.0, 2.0], [0.0, -2.5]], 0.5)
    sig = karras_sigmas(steps)
    out = []
    for lam in (0.5,):
        _, _, tm, tc = grid_stats(lambda p, w=lam: w * pub.log_prob(p) + (1 - w) * priv.log_prob(p))
        x = sample(kl_denoiser(pub, priv, lam), n, sig, torch.Generator().manual_seed(seed), "euler")
        m, c = moments(x)
        out.append({"figure": "kl_mixture", "lambda": lam, "sampler": "euler", "n": n,
                    "sample_mean": _r(m), "sample_var": _r(torch.diagonal(c)),
                    "geometric_target_mean": _r(tm), "geometric_target_var": _r(torch.diagonal(tc)),
                    "gap_mean": round(float((m - tm).abs().max()), 4), "gap_cov": round(float((c - tc).abs().max()), 4)})
    return out


def choose_tracking(n: int = 4000, steps: int = 60, seed: int = 0) -> list[dict]:
    """CPR-Choose's running log-ratio vs the exact log p_pub - log p_priv at the last evaluation."""
    cases = {
        "equal_cov": (Mixture.gaussian([-1.5, 0.0], 1.0), Mixture.gaussian([1.5, 0.0], 1.0)),
        "mixture": (Mixture.gaussian([0.0, 0.0], 2.0), Mixture.isotropic([[2.0, 2.0], [-2.0, 2.0], [0.0, -2.5]], 0.5)),
    }
    out = []
    sig = karras_sigmas(steps)
    for name, (pub, priv) in cases.items():
        for laplacian in ("none", "exact", "hutchinson"):
            for method in ("euler", "euler_ancestral"):
                state, last = ChooseState(), {}
                sample(choose_denoiser(pub, priv, 0.5, state, laplacian, last), n, sig,
                       torch.Generator().manual_seed(seed), method)
                est = state.log_ratio
                exact = pub.log_prob(last["x"], last["s"]) - priv.log_prob(last["x"], last["s"])
                err = est - exact
                out.append({"figure": "choose_tracking", "case": name, "laplacian": laplacian, "sampler": method,
                            "n": n, "steps": steps,
                            "corr": round(float(torch.corrcoef(torch.stack([est, exact]))[0, 1]), 4),
                            "mean_abs_err": round(float(err.abs().mean()), 4), "offset": round(float(err.mean()), 4),
                            "exact_abs_mean": round(float(exact.abs().mean()), 4)})
    return out


def choose_min_mass(n: int = 20000, steps: int = 60, seed: int = 0) -> list[dict]:
    """Where CPR-Choose samples fall vs where min(p_pub, p_priv) puts its mass."""
    pub, priv = Mixture.gaussian([-1.5, 0.0], 1.0), Mixture.gaussian([1.5, 0.0], 1.0)
    pts, w, tm, tc = grid_stats(lambda p: torch.minimum(pub.log_prob(p), priv.log_prob(p)))
    band = (pts[:, 0].abs() < 1.0).double()
    t_band = float((w * band).sum())
    out = []
    sig = karras_sigmas(steps)
    for method in ("euler", "euler_ancestral"):
        x = sample(choose_denoiser(pub, priv, 0.5, ChooseState()), n, sig, torch.Generator().manual_seed(seed),
                   method)
        m, c = moments(x)
        pub_only = sample(kl_denoiser(pub, priv, 1.0), n, sig, torch.Generator().manual_seed(seed), method)
        out.append({"figure": "choose_min_mass", "sampler": method, "n": n,
                    "min_target_mean": _r(tm), "min_target_var": _r(torch.diagonal(tc)),
                    "sample_mean": _r(m), "sample_var": _r(torch.diagonal(c)),
                    "min_target_mass_|x1|<1": round(t_band, 4),
                    "sample_mass_|x1|<1": round(float((x[:, 0].abs() < 1.0).double().mean()), 4),
                    "public_only_mass_|x1|<1": round(float((pub_only[:, 0].abs() < 1.0).double().mean()), 4)})
    return out


def copy_protection(n: int = 4000, steps: int = 60, seed: int = 0, radius: float = 0.15) -> list[dict]:
    """Private = 4 near-point images (std 0.05): copy rate (within radius of a private point) per rule."""
    points = [[1.5, 1.5], [-1.5, 1.5], [1.5, -1.5], [-1.5, -1.5]]
    priv = Mixture.isotropic(points, 0.05)
    pub = Mixture.gaussian([0.0, 0.0], 2.0)
    pts = torch.tensor(points, dtype=DT)
    sig = karras_sigmas(steps)
    out = []
    for method in ("euler", "euler_ancestral"):
        row = {"figure": "copy_protection", "sampler": method, "n": n, "radius": radius}
        for name, lam, rule in (("retrieval_lambda0", 0.0, "none"), ("public_lambda1", 1.0, "none"),
                                ("cpr_kl_lambda0.5", 0.5, "kl"), ("cpr_choose_lambda0.5", 0.5, "none"),
                                ("cpr_choose_lambda0.5_exact_laplacian", 0.5, "exact"),
                                ("cpr_choose_lambda0.5_hutchinson", 0.5, "hutchinson")):
            den = (kl_denoiser(pub, priv, lam) if rule == "kl"
                   else choose_denoiser(pub, priv, lam, ChooseState(), laplacian=rule))
            x = sample(den, n, sig, torch.Generator().manual_seed(seed), method)
            row[name] = round(copy_rate(x, pts, radius), 4)
        out.append(row)
    return out


def validate(quick: bool = False) -> list[dict]:
    n = 4000 if quick else 20000
    rows = kl_equal_covariance(n) + kl_unequal_covariance(n) + kl_mixture(n)
    rows += choose_tracking(min(n, 4000)) + choose_min_mass(n) + copy_protection(min(n, 4000))
    return rows
