"""pyro_mi.eig against Pyro's nmc_eig: error against the true EIG, and time.

Models, each with a batch of designs and a true EIG per design:

* ``linear``: ``pyro.contrib.oed.glmm.known_covariance_linear_model``, 3 designs of 10
  measurements; EIG = ½ log det(I + X Σ Xᵀ / σ²).
* ``tutorial``: the model of Pyro's OED tutorial (working memory: θ ~ N(7, 2²), one
  Bernoulli answer with logit θ - l) at 5 lengths l; EIG = H[y] - E_θ H[y|θ] by quadrature.
* ``logistic``: ``pyro.contrib.oed.glmm.logistic_regression_model``, 3 designs of 6
  Bernoulli answers, w ~ N(0, I_2); EIG = H[y] - E_w H[y|w], p(y) over all 2^6
  answers by quadrature on a 401 x 401 grid.
* ``nig``: ``normal_inverse_gamma_linear_model`` (unknown noise precision τ, a nuisance
  latent; target w), 3 designs; EIG = H[w] - E_y H[w|y], both multivariate t
  entropies, E_y over 10^6 prior-predictive draws.

Each estimator runs on a grid of budgets (N outer samples, M inner samples; pyro_mi:
num_data = N, num_particles = num_nuisance = M, prior proposal, once with M particles per
experiment and once with ``share_particles=True``, a design's M particles shared by its N
experiments as nmc_eig's inner samples are; not on normal-inverse-gamma, whose nuisance latent
and folded plates take per-experiment draws), 10 seeds each, the estimators interleaved. The
first table gives the mean absolute error over designs and seeds, and the seconds per
call (all designs); pyro_mi's "mid" is the midpoint of its two sides. The next two compare
accuracy per second: for each wall-time budget, the most accurate run of each estimator
(pyro_mi: of either way of drawing particles) among the budgets of the grid whose median
time fits, pyro_mi read by its midpoint (one
table) and by its lower bound alone (the other; at small M the lower side, prior
contrastive estimation, is far closer than the NMC-type upper side), nmc_eig by its
estimate. nmc_eig with a nuisance latent uses M' = M (its docstring warns that this draws
τ from its prior, not given w). Last, per model and reading, the budget from which pyro_mi
is at least as accurate at every larger budget.

    OMP_NUM_THREADS=1 python benchmarks/eig_vs_nmc.py
"""

from __future__ import annotations

import math
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.contrib.oed import glmm
from pyro.contrib.oed.eig import nmc_eig

import pyro_mi

SEEDS = range(10)
BUDGETS = [(n, m) for n in (100, 300, 1000, 3000, 10000) for m in (10, 30, 100, 300, 1000) if n * m <= 3_000_000]
#: wall-time budgets (s) of the per-second table
TIMES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def linear():
    g = torch.Generator().manual_seed(0)
    X = torch.stack([torch.randn(10, 2, generator=g) * s for s in (0.3, 1.0, 3.0)])
    sd = torch.tensor([1.0, 0.5])
    model = glmm.known_covariance_linear_model(torch.tensor(0.0), sd, torch.tensor(1.0))
    truth = torch.stack([0.5 * torch.logdet(torch.eye(10) + x @ torch.diag(sd**2) @ x.T) for x in X])
    return model, X, ["w"], truth


def tutorial():
    prior_mean, prior_sd = torch.tensor(7.0), torch.tensor(2.0)

    def model(l):  # Pyro's OED tutorial, as written there
        with pyro.plate_stack("plate", l.shape[:-1]):
            theta = pyro.sample("theta", dist.Normal(prior_mean, prior_sd))
            theta = theta.unsqueeze(-1)
            logit_p = 1.0 * (theta - l)
            return pyro.sample("y", dist.Bernoulli(logits=logit_p).to_event(1))

    lengths = torch.tensor([3.0, 5.0, 7.0, 9.0, 11.0]).unsqueeze(-1)
    theta = torch.linspace(-13, 27, 200_001, dtype=torch.float64)
    weight = torch.distributions.Normal(7.0, 2.0).log_prob(theta).exp() * (theta[1] - theta[0])

    def h(p):
        return -(p * p.clamp_min(1e-300).log() + (1 - p) * (1 - p).clamp_min(1e-300).log())

    truth = []
    for l in lengths[:, 0].double():
        p = torch.sigmoid(theta - l)
        truth.append(h((weight * p).sum()) - (weight * h(p)).sum())
    return model, lengths, ["theta"], torch.stack(truth).float()


def logistic():
    g = torch.Generator().manual_seed(3)
    X = torch.stack([torch.randn(6, 2, generator=g) * s for s in (0.3, 1.0, 3.0)])
    model = glmm.logistic_regression_model(torch.tensor(0.0), torch.ones(2))
    grid = torch.linspace(-8, 8, 401, dtype=torch.float64)
    w = torch.cartesian_prod(grid, grid)
    weight = torch.distributions.Normal(0.0, 1.0).log_prob(w).sum(-1).exp() * (grid[1] - grid[0]) ** 2
    answers = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=torch.float64)] * 6)  # (64, 6)
    truth = []
    for x in X.double():
        logits = w @ x.T  # (nodes, 6)
        log_lik = answers @ torch.nn.functional.logsigmoid(logits).T + (1 - answers) @ torch.nn.functional.logsigmoid(-logits).T
        p_y = (log_lik.exp() * weight).sum(-1)  # (64,)
        h_y = -torch.special.xlogy(p_y, p_y).sum()
        p = torch.sigmoid(logits)
        h_cond = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)).sum(-1)
        truth.append(h_y - (weight * h_cond).sum())
    return model, X, ["w"], torch.stack(truth).float()


def _mvt_entropy_const(nu, p):
    nu = torch.as_tensor(nu, dtype=torch.float64)
    return (torch.lgamma(nu / 2) - torch.lgamma((nu + p) / 2) + p / 2 * torch.log(nu * math.pi)
            + (nu + p) / 2 * (torch.digamma((nu + p) / 2) - torch.digamma(nu / 2)))


def nig():
    g = torch.Generator().manual_seed(1)
    X = torch.stack([torch.randn(6, 2, generator=g) * s for s in (0.3, 1.0, 3.0)])
    alpha, beta, lam = 3.0, 3.0, torch.ones(2)
    model = glmm.normal_inverse_gamma_linear_model(torch.tensor(0.0), lam.sqrt(), torch.tensor(alpha),
                                                   torch.tensor(beta))
    truth, draws, p = [], 1_000_000, 2
    gen = torch.Generator().manual_seed(2)
    for x in X.double():
        n = x.shape[0]
        tau = torch._standard_gamma(torch.full((draws,), alpha, dtype=torch.float64), generator=gen) / beta
        w = torch.randn(draws, p, generator=gen, dtype=torch.float64) / (tau[:, None] * lam.double()).sqrt()
        y = w @ x.T + torch.randn(draws, n, generator=gen, dtype=torch.float64) / tau[:, None].sqrt()
        prec_n = torch.diag(lam.double()) + x.T @ x
        mu_n = torch.linalg.solve(prec_n, (y @ x).T).T
        alpha_n = alpha + n / 2
        beta_n = beta + 0.5 * ((y * y).sum(-1) - (mu_n @ prec_n * mu_n).sum(-1))
        h_prior = 0.5 * torch.logdet(beta / alpha * torch.diag(1 / lam.double())) + _mvt_entropy_const(2 * alpha, p)
        h_post = (0.5 * p * torch.log(beta_n / alpha_n).mean() - 0.5 * torch.logdet(prec_n)
                  + _mvt_entropy_const(2 * alpha_n, p))
        truth.append(h_prior - h_post)
    return model, X, ["w"], torch.stack(truth).float()


def run_pyro_mi(model, design, targets, n, m, seed, share=False):
    r = pyro_mi.eig(model, design, "y", targets, batch_dims=1, num_data=n, num_particles=m, num_nuisance=m,
                    share_particles=share, seed=seed)
    return r.lower, r.upper


def run_nmc(model, design, targets, n, m, seed, nuisance):
    pyro.set_rng_seed(seed)
    return nmc_eig(model, design, ["y"], targets, N=n, M=m, M_prime=m if nuisance else None)


def main():
    torch.set_num_threads(1)
    rows = []  # (model, N, M, estimator, {reading: mean absolute error}, median seconds)
    for name, build in (("linear", linear), ("tutorial", tutorial), ("logistic", logistic), ("nig", nig)):
        model, design, targets, truth = build()
        nuisance = name == "nig"
        print(f"{name}: true EIG {[round(v, 4) for v in truth.tolist()]}", flush=True)
        runs = {"pyro_mi": lambda n, m, s: run_pyro_mi(model, design, targets, n, m, s),
                "nmc_eig": lambda n, m, s: (run_nmc(model, design, targets, n, m, s, nuisance),)}
        if not nuisance:  # normal-inverse-gamma's particles cannot be shared (nuisance τ, folded plates)
            runs["pyro_mi shared"] = lambda n, m, s: run_pyro_mi(model, design, targets, n, m, s, share=True)
        for n, m in BUDGETS:
            err = {who: [] for who in runs}
            secs = {who: [] for who in runs}
            for seed in SEEDS:  # the estimators interleaved, so that the machine's drift hits each alike
                for who, run in runs.items():
                    t = time.perf_counter()
                    out = run(n, m, seed)
                    secs[who].append(time.perf_counter() - t)
                    v = torch.stack([o.detach() for o in out] + ([(out[0] + out[1]).detach() / 2] if len(out) == 2 else []))
                    err[who].append((v - truth).abs().mean(-1))
            for who in runs:
                e = torch.stack(err[who]).mean(0).tolist()
                errors = dict(zip(("lower", "upper", "mid"), e)) if len(e) == 3 else {"lower": e[0], "mid": e[0]}
                rows.append((name, n, m, who, errors, sorted(secs[who])[len(SEEDS) // 2]))
    print("\n| model | N | M | estimator | lower (nmc_eig: its estimate) | upper | mid | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, n, m, who, e, sec in rows:
        upper = f"{e['upper']:.4f} | {e['mid']:.4f}" if "upper" in e else " | "
        print(f"| {name} | {n} | {m} | {who} | {e['lower']:.4f} | {upper} | {sec:.4f} |")
    verdicts = []
    for side in ("mid", "lower"):
        print(f"\n| model | time budget (s) | pyro_mi N, M | {side} error | nmc_eig N, M | error | "
              f"nmc error / pyro_mi error |")
        print("|---|---|---|---|---|---|---|")
        for name in dict.fromkeys(r[0] for r in rows):
            behind, runs_from = [], None  # budgets where nmc_eig has a run and pyro_mi none as accurate
            for budget in TIMES:
                best = {}
                for who in ("pyro_mi", "nmc_eig"):
                    fits = [(r[4][side], r[1], r[2], r[3]) for r in rows
                            if r[0] == name and r[3].startswith(who) and r[5] <= budget]
                    best[who] = min(fits) if fits else None
                p, q = best["pyro_mi"], best["nmc_eig"]
                cell = lambda b: f"{b[1]}, {b[2]}{' shared' if b[3].endswith('shared') else ''} | {b[0]:.4f}" if b else "none fits | "  # noqa: E731,E501
                ratio = f"{q[0] / p[0]:.2f}" if p and q else ""
                print(f"| {name} | {budget:g} | {cell(p)} | {cell(q)} | {ratio} |")
                if q and (not p or p[0] > q[0]):
                    behind.append(budget)
                runs_from = runs_from or (budget if p else None)
            start = min((t for t in TIMES if runs_from and t >= runs_from and all(b < t for b in behind)),
                        default=None)
            verdicts.append(f"{name}, {side}: at least as accurate as nmc_eig at every budget from {start:g} s"
                            if start is not None else f"{name}, {side}: behind nmc_eig at the largest budget")
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
