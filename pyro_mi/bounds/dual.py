"""Sample-only MI lower bounds from dual representations of the KL divergence.

I(x; z) = KL[p(x, z) || p(x) p(z)]. For any critic T(x, z), with P the joint
and Q = p(x) p(z) (negative pairs made by re-pairing samples, Belghazi et al.
2018, footnote 5):

* **MINE** (Donsker–Varadhan; Belghazi et al. 2018, eq. 6, 10–11):
  E_P[T] - log E_Q[e^T]. Trained with the moving-average gradient correction of
  sec. 3.2: the minibatch gradient E_B[∇T] - E_B[∇T e^T] / E_B[e^T] (eq. 12) is
  biased, so the denominator is replaced by an exponential moving average of
  E_B[e^T] (rate ``ema_rate``; 0 gives the naive biased gradient).
* **MINE-f** (f-divergence form; Belghazi et al. 2018, eq. 8):
  E_P[T] - E_Q[e^(T-1)].
* **NWJ** (Nguyen, Wainwright & Jordan 2010): the same functional as MINE-f;
  both names are kept because both papers' names are in use.
* **ξ-bound** (VAE-MINE appendix, eq. 2): E_P[T] - ξ E_Q[e^T] + log ξ + 1 for
  ξ > 0, from log u <= ξu - log ξ - 1. ξ = 1/e is NWJ / MINE-f; the optimal ξ
  for a fixed T is 1 / E_Q[e^T], where the bound equals Donsker–Varadhan (eq. 3–4).
  ξ is either fixed or optimised jointly with T.
* **InfoNCE** (van den Oord et al. 2018; Brekelmans et al. 2022, sec. 2.4 with
  q = p(z)): (1/K) sum_i [T(x_i, z_i) - log (1/K) sum_j e^T(x_i, z_j)] over a batch
  of K pairs; always <= log K. Default critic: separable f(x)ᵀg(z), all K x K
  pairs in one matrix product.

For every bound, DV >= ξ-bound for any ξ (and so DV >= MINE-f = NWJ) for the same
critic and the same negative pairs, because log u <= ξu - log ξ - 1.

Per-point values and standard errors. The reported numbers are means of per-sample
values whose mean is exactly the bound on the evaluation set and whose standard
deviation / sqrt(n) is the bound's standard error. With negatives (x_i, z_j) for
pairs (i, j) in a set where every sample is used m times as x and m times as z,
a_k / b_k the mean of e^T over the negative pairs where sample k gives the x / the
z, and Ẑ the mean of e^T over all of them, deleting sample k leaves
Ẑ_{-k} = (n Ẑ - a_k - b_k) / (n - 2) and the joint mean P_{-k} = (n P - T_kk) / (n - 1),
so the delete-one jackknife is exact and cheap: the values are the jackknife
pseudo-values n B - (n - 1) B_{-k}, shifted to mean B. Their spread is the
jackknife variance, which keeps the curvature of log Ẑ and the variance of Ẑ
itself that a first-order (delta-method) error drops when a few pairs dominate Ẑ.
For InfoNCE the values are the row values T(x_i, z_i) - log (1/K) sum_j e^T(x_i, z_j),
each <= log K (kept as they are: correcting them for the negatives that rows share
changed the standard error little, the docs' tuning page).

Negative pairs come from the cyclic shifts of a random order of the samples
(pair i with i + r, r = 1..m), so m = n - 1 shifts score all pairs and m = 1 is
"shuffling within the batch" (with no sample paired with itself).

Small evaluation sets. :func:`fit_dual_bound` refuses to report a bound on fewer
than :data:`MIN_TEST_SAMPLES` (100) held-out samples: below that, the reported standard
error under-covered the error on correlated Gaussians (the docs' tuning page).

A result warns (``result.warnings``) when the top 1% of the negative terms carry more
than :data:`HEAVY_TAIL_SHARE` (85%) of Ẑ: the bound then rests on a handful of pairs,
and its standard error may be too small (the threshold's measurements: the docs' tuning page).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..critics import JointCritic, SeparableCritic, check_critic
from ..result import MIResult
from ..runtime import cli
from ..training import TrainingLog, split_indices, train
from ..weights import log_mean_exp

#: the sample-only methods of :func:`fit_dual_bound` (and ``pyro-mi estimate-samples``)
DUAL_METHODS = ("mine", "mine-f", "nwj", "infonce", "xi")
NEGATIVES = ("shuffle", "all")

#: critic evaluations per chunk when scoring many pairs
CHUNK_EVALS = 1 << 16
#: validation and the training-part bound use at most this many samples of their splits
EVALUATION_POINTS = 1 << 16

#: the fewest samples a bound is reported on (the test split; the training samples when
#: ``test_fraction=0``): :func:`fit_dual_bound` raises ValueError below it (module docstring)
MIN_TEST_SAMPLES = 100

#: the largest K InfoNCE's test evaluation tries (:func:`_infonce_test_k`): its ceiling log K
#: grows with K, and a bound with any K is valid
INFONCE_TEST_NEGATIVES = 4096

#: default (val_fraction, test_fraction) of :func:`fit_dual_bound` by method (None: the others).
#: InfoNCE's bound is at most log K, and K is at most the size of the test split, so InfoNCE holds
#: out more for the test and less for validation (chosen on the bmi benchmark, ``benchmarks/samples_bmi.py``)
SPLITS = {None: (0.2, 0.2), "infonce": (0.1, 0.4)}

#: the share of Ẑ carried by the top 1% of the negative terms above which a result warns of heavy tails
HEAVY_TAIL_SHARE = 0.85


# --------------------------------------------------------------------- bounds on scores
def dv_bound(t_pos: torch.Tensor, t_neg: torch.Tensor) -> torch.Tensor:
    """Donsker–Varadhan bound mean(t_pos) - log mean(exp t_neg), nats (Belghazi et al. 2018, eq. 6).

    Args:
        t_pos: critic scores of joint pairs, any shape.
        t_neg: critic scores of negative (product-of-marginals) pairs, any shape.
    Returns: a scalar tensor.
    """
    return t_pos.mean() - log_mean_exp(t_neg)


def xi_bound(t_pos: torch.Tensor, t_neg: torch.Tensor, log_xi: torch.Tensor | float) -> torch.Tensor:
    """ξ-bound mean(t_pos) - ξ mean(exp t_neg) + log ξ + 1, nats (VAE-MINE appendix, eq. 2).

    Args:
        t_pos, t_neg: critic scores of joint and negative pairs.
        log_xi: log ξ (a float or a tensor, so that ξ > 0 can be optimised).
    Returns: a scalar tensor. ``log_xi = -1`` gives :func:`nwj_bound`.
    """
    log_xi = torch.as_tensor(log_xi, dtype=t_neg.dtype, device=t_neg.device)
    return t_pos.mean() - torch.exp(log_mean_exp(t_neg) + log_xi) + log_xi + 1


def nwj_bound(t_pos: torch.Tensor, t_neg: torch.Tensor) -> torch.Tensor:
    """NWJ / MINE-f bound mean(t_pos) - mean(exp(t_neg - 1)), nats (Belghazi et al. 2018, eq. 8)."""
    return t_pos.mean() - torch.exp(log_mean_exp(t_neg) - 1)


def infonce_bound(scores: torch.Tensor) -> torch.Tensor:
    """InfoNCE mean_i [s_ii - log (1/K) sum_j exp s_ij] for scores (K, K), nats; <= log K.

    ``scores[i, j] = T(x_i, z_j)``; the diagonal holds the joint pairs
    (Brekelmans et al. 2022, eq. 7 with q = p(z); van den Oord et al. 2018).
    """
    return (scores.diagonal() - log_mean_exp(scores, 1)).mean()


class MovingAverage:
    """Exponential moving average of E_B[e^T] in log space, for MINE's corrected gradient.

    Belghazi et al. 2018, sec. 3.2: the DV minibatch gradient
    E_B[∇T] - E_B[∇T e^T] / E_B[e^T] (eq. 12) is biased; replacing the
    denominator by a moving average reduces the bias.

    Args:
        rate: weight of the newest batch (0 < rate <= 1; 1 gives the naive gradient).
    """

    def __init__(self, rate: float = 0.01):
        if not 0 < rate <= 1:
            raise ValueError(f"ema_rate must be in (0, 1], got {rate!r}")
        self.rate = rate
        self.log_value: torch.Tensor | None = None

    def surrogate(self, t_pos: torch.Tensor, t_neg: torch.Tensor) -> torch.Tensor:
        """A scalar whose value is the DV bound on the batch and whose gradient is MINE's corrected one.

        Gradient: E_B[∇T(pos)] - E_B[∇T(neg) e^T(neg)] / ema, where ema is the
        moving average of E_B[e^T(neg)] including this batch (no gradient through it).
        """
        lme = log_mean_exp(t_neg)
        with torch.no_grad():
            if self.log_value is None:
                self.log_value = lme.detach().clone()
            else:
                self.log_value = torch.logaddexp(
                    self.log_value + math.log1p(-self.rate) if self.rate < 1 else torch.full_like(lme, -math.inf),
                    lme.detach() + math.log(self.rate),
                )
        # d/dθ exp(lme - c) = E_B[e^T ∇T] / e^c
        corrected = t_pos.mean() - torch.exp(lme - self.log_value)
        value = t_pos.mean() - lme
        return corrected + (value - corrected).detach()


# --------------------------------------------------------------------- negatives and scoring
def shift_pairs(n: int, num_shifts: int, *, generator=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (ix, iz), each (num_shifts, n), of negatives from cyclic shifts of a random order.

    Pair ``(ix[r, i], iz[r, i]) = (p_i, p_{(i + r + 1) mod n})`` for a random
    permutation p: no sample is paired with itself, every sample appears
    ``num_shifts`` times as x and as z; ``num_shifts = n - 1`` gives all pairs.

    Raises:
        ValueError: ``num_shifts`` not in [1, n - 1].
    """
    if not 1 <= num_shifts <= n - 1:
        raise ValueError(f"num_shifts must be in [1, {n - 1}] for {n} samples, got {num_shifts}")
    p = torch.randperm(n, generator=generator).to(device)
    ar = torch.arange(n, device=p.device)
    r = torch.arange(1, num_shifts + 1, device=p.device)[:, None]
    return p.expand(num_shifts, n), p[(ar + r) % n]


def _score_pairs(critic, x, z, ix, iz) -> torch.Tensor:
    """critic(x[ix], z[iz]) in chunks of :data:`CHUNK_EVALS` pairs: (m, n)."""
    fx, fz = ix.reshape(-1), iz.reshape(-1)
    out = [critic(x[fx[s : s + CHUNK_EVALS]], z[fz[s : s + CHUNK_EVALS]]) for s in range(0, fx.numel(), CHUNK_EVALS)]
    return torch.cat(out).reshape(ix.shape)


def _marginal_stats(t_neg: torch.Tensor, ix: torch.Tensor, iz: torch.Tensor, n: int):
    """log a_k, log b_k (n,) and log Ẑ from negative scores (m, n) of pairs (ix, iz)."""
    m = t_neg.shape[0]
    flat = t_neg.reshape(-1)
    log_z = log_mean_exp(flat)
    # scatter a logsumexp: shift by the max so that the sums are of numbers <= 1
    c = flat.max()
    e = torch.exp(flat - c)
    a = torch.zeros(n, dtype=e.dtype, device=e.device).index_add_(0, ix.reshape(-1), e)
    b = torch.zeros(n, dtype=e.dtype, device=e.device).index_add_(0, iz.reshape(-1), e)
    return torch.log(a / m) + c, torch.log(b / m) + c, log_z


def _jackknife_values(
    t_pos: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor, log_z: torch.Tensor, log_xi: float | None
) -> torch.Tensor:
    """Delete-one jackknife pseudo-values (n,) of DV (``log_xi`` None) or the ξ-bound, shifted to mean
    the bound (see the module docstring); computed in float64, returned in ``t_pos``'s dtype."""
    n = t_pos.numel()
    t, la, lb, lz = (v.double() for v in (t_pos, log_a, log_b, log_z))

    def bound(mean_pos, log_zhat):
        if log_xi is None:
            return mean_pos - log_zhat
        return mean_pos - torch.exp(log_zhat + log_xi) + log_xi + 1

    full = bound(t.mean(), lz)
    # the mass of Ẑ left without sample k's pairs; tiny (not 0) when its pairs hold all of it
    rest = (n - torch.exp(la - lz) - torch.exp(lb - lz)).clamp_min(torch.finfo(torch.float64).tiny)
    minus = bound((t.sum() - t) / (n - 1), lz + torch.log(rest) - math.log(n - 2))
    pseudo = n * full - (n - 1) * minus
    return (pseudo - pseudo.mean() + full).to(t_pos.dtype)


def _infonce_values(critic, x, z, num_negatives, generator) -> torch.Tensor:
    """InfoNCE row values T(x_i, z_i) - log (1/K) sum_j e^T(x_i, z_j), each <= log K: (n,)."""
    n = x.shape[0]
    K = min(n, num_negatives or 256)
    p = torch.randperm(n, generator=generator).to(x.device)
    rows = torch.empty(n, dtype=x.dtype, device=x.device)
    pair = getattr(critic, "pairwise", None) or (lambda a, b: critic(a.unsqueeze(1), b.unsqueeze(0)))
    step = max(1, CHUNK_EVALS // K)  # rows scored at a time
    for s in range(0, n, K):
        r = min(K, n - s)
        idx = p[(s + torch.arange(K, device=p.device)) % n]
        zs = z[idx]
        for a in range(0, r, step):
            b = min(r, a + step)
            scores = pair(x[idx[a:b]], zs)  # (b - a, K), the positives at columns a..b-1
            rows_i = torch.arange(b - a, device=scores.device)
            pos = scores[rows_i, rows_i + a]
            rows[p[s + a : s + b]] = pos - log_mean_exp(scores, 1)
    return rows


def _evaluate(method, critic, x, z, *, log_xi, num_shifts, num_negatives, generator):
    """(per-point values (n,), tail share) of :func:`per_point_values`; the tail share is the
    fraction of Ẑ carried by the top 1% of the negative terms (None for InfoNCE)."""
    if method == "infonce":
        return _infonce_values(critic, x, z, num_negatives, generator), None
    if method not in DUAL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(DUAL_METHODS)}")
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"need at least 3 samples to evaluate the {method} bound, got {n}")
    if num_shifts is None:
        num_shifts = max(1, min(n - 1, (1 << 18) // n))
    ix, iz = shift_pairs(n, num_shifts, generator=generator, device=x.device)
    t_pos = torch.cat([critic(x[s : s + CHUNK_EVALS], z[s : s + CHUNK_EVALS]) for s in range(0, n, CHUNK_EVALS)])
    t_neg = _score_pairs(critic, x, z, ix, iz)
    log_a, log_b, log_z = _marginal_stats(t_neg, ix, iz, n)
    if method == "mine":
        lx = None
    else:
        lx = -1.0 if (method != "xi" or log_xi is None) else float(log_xi)
    flat = t_neg.reshape(-1)
    top = flat.topk(max(1, flat.numel() // 100)).values
    share = float(torch.exp(torch.logsumexp(top, 0) - torch.logsumexp(flat, 0)))
    return _jackknife_values(t_pos, log_a, log_b, log_z, lx), share


def per_point_values(
    method: str,
    critic: Callable,
    x: torch.Tensor,
    z: torch.Tensor,
    *,
    log_xi: float | None = None,
    num_shifts: int | None = None,
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample values (n,) whose mean is the bound on (x, z) and whose std/√n is its standard error.

    Args:
        method: one of :data:`DUAL_METHODS`.
        critic: T(x, z) (a :mod:`pyro_mi.critics` module or any callable with
            ``critic(x, z)`` and, for InfoNCE, ``critic.pairwise``).
        x: (n, dx), z: (n, dz) joint samples.
        log_xi: log ξ for ``"xi"`` (default -1, i.e. NWJ).
        num_shifts: negatives per sample for the DV/ξ-type bounds (default all
            n - 1 other samples, capped so that n * num_shifts <= 2^18).
        num_negatives: K, the InfoNCE batch: each x_i is scored against its own
            z_i and K - 1 other z's (default min(n, 256)).
        generator: torch generator for the random order.

    Returns:
        (n,) values in nats: for DV and ξ the shifted jackknife pseudo-values, for
        InfoNCE the row values, each at most log K (module docstring).

    Raises:
        ValueError: an unknown method; fewer than 3 samples for DV and ξ.
    """
    return _evaluate(
        method, critic, x, z, log_xi=log_xi, num_shifts=num_shifts, num_negatives=num_negatives, generator=generator
    )[0]


# --------------------------------------------------------------------- training
class _LogXi(nn.Module):
    """log ξ as a trainable parameter of the ξ-bound."""

    def __init__(self, init: float, trainable: bool, dtype, device):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(init, dtype=dtype, device=device), requires_grad=trainable)


#: the critics :func:`fit_dual_bound` builds by name; "auto" trains a separable and a joint one
#: and keeps the one with the higher validation bound
CRITICS = ("auto", "joint", "separable")
#: how :func:`fit_dual_bound` maps x and z, coordinate by coordinate, before training
PREPROCESS = ("robust", "standardize", "gaussianize", "none")
#: hidden sizes of the joint candidate of ``critic="auto"`` (bmi's default MLP): it scores all
#: B x B pairs of a batch, so a wide one costs B times a separable critic of the same width
AUTO_JOINT_HIDDEN = (16, 8)


def default_critics(method: str, x_dim: int, z_dim: int, hidden_sizes=(256, 256), embed_dim: int = 32,
                    kind: str | None = None) -> list[nn.Module]:
    """The candidate critics of a ``kind`` (:data:`CRITICS`): one for ``"joint"`` (a ReLU MLP on
    [x, z] of ``hidden_sizes``) or ``"separable"`` (f(x)ᵀg(z) with SiLU MLPs f, g, all K x K pairs
    in one matrix product); for ``"auto"`` both, the joint one with :data:`AUTO_JOINT_HIDDEN`, of
    which :func:`fit_dual_bound` keeps the one with the higher validation bound. None: ``"auto"``
    for InfoNCE and ``"joint"`` for the others.

    Chosen by measurement on 13 tasks of the bmi benchmark (``benchmarks/samples_bmi.py``; the
    tuning runs are on the docs' tuning page): neither single critic wins everywhere (separable on the
    Student-t tasks and the spiral, joint on the dense multinormals and additive noise), so
    ``"auto"`` lets the validation split choose; SiLU units in f and g fit the quadratic log
    density ratios of Gaussians better than ReLU. MINE and NWJ use the joint critic.

    Raises:
        ValueError: an unknown ``kind``.
    """
    kind = kind or ("auto" if method == "infonce" else "joint")
    if kind not in CRITICS:
        raise ValueError(f"critic must be a module or one of {CRITICS}, got {kind!r}")
    if kind == "joint":
        return [JointCritic(x_dim, z_dim, hidden_sizes=tuple(hidden_sizes))]
    separable = SeparableCritic(x_dim, z_dim, embed_dim=embed_dim, hidden_sizes=tuple(hidden_sizes), activation=nn.SiLU)
    if kind == "separable":
        return [separable]
    return [separable, JointCritic(x_dim, z_dim, hidden_sizes=AUTO_JOINT_HIDDEN)]


def _gaussianizer(train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per coordinate, rank -> standard normal quantile, fitted on ``train`` (n, d): piecewise
    linear through the normal scores of the sorted distinct training values and, beyond
    them, q_end ± log(1 + slope_end |a - v_end|) (the end segment's slope at the end, then
    logarithmic, so that far samples stay near the bulk). Strictly increasing, so an
    invertible map, which keeps the MI."""
    normal = torch.distributions.Normal(0.0, 1.0)
    knots = []
    for col in train.T:
        v, counts = torch.unique(col, return_counts=True)
        ranks = counts.cumsum(0) - (counts - 1) / 2.0  # mid-ranks of ties, 1-based
        knots.append((v, normal.icdf((ranks - 0.5) / col.numel()).to(col.dtype)))

    def apply(a: torch.Tensor) -> torch.Tensor:
        out = []
        for (v, q), col in zip(knots, a.T.contiguous()):
            if v.numel() < 2:
                out.append(col - v[0])
                continue
            i = torch.searchsorted(v, col).clamp(1, v.numel() - 1)  # the segment [v[i-1], v[i]]
            slope = (q[i] - q[i - 1]) / (v[i] - v[i - 1])
            inside = q[i - 1] + slope * (col - v[i - 1])
            below = q[0] - torch.log1p(slope * (v[0] - col).clamp_min(0))
            above = q[-1] + torch.log1p(slope * (col - v[-1]).clamp_min(0))
            out.append(torch.where(col < v[0], below, torch.where(col > v[-1], above, inside)))
        return torch.stack(out, 1)

    return apply


def preprocessor(kind: str, train: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A per-coordinate, strictly increasing map fitted on the training samples ``train`` (n, d).

    ``"robust"``: asinh((a - median) / (IQR / 1.349)), the IQR replaced by the std where it
    is 0 (a coordinate with many ties): the identity near the median, logarithmic in the
    tails, so that a few far samples neither dominate the critic's inputs nor, through
    e^T, the evaluation; ``"standardize"``: (a - mean) / std; ``"gaussianize"``: the
    rank -> normal-quantile map of :func:`_gaussianizer`; ``"none"``: the identity. Each is
    strictly increasing, so invertible, and I(x; z) is unchanged (MI is invariant under
    invertible maps of x and of z; a per-coordinate map is invertible exactly when it is
    strictly monotone).

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {kind!r}")
    if kind == "none":
        return lambda a: a
    if kind == "gaussianize":
        return _gaussianizer(train)
    if kind == "robust":
        q = torch.quantile(train, torch.tensor([0.25, 0.5, 0.75], dtype=train.dtype, device=train.device), dim=0)
        center, scale = q[1], (q[2] - q[0]) / 1.349
        scale = torch.where(scale > 0, scale, train.std(0)).clamp_min(1e-8)
        return lambda a: torch.asinh((a - center) / scale)
    center, scale = train.mean(0), train.std(0).clamp_min(1e-8)
    return lambda a: (a - center) / scale


@dataclass(frozen=True)
class DualBound:
    """A lower bound on I(x; z) from paired samples alone, declared: :meth:`fit` fits a critic by it and
    reports it on held-out samples (MINE: Belghazi et al. 2018; NWJ: Nguyen et al. 2010; InfoNCE: van
    den Oord et al. 2018; the ξ-bound: Poole et al. 2019, eq. 12 with ξ free).

    Splits the n samples into train / validation / test parts, maps x and z
    coordinate by coordinate with a strictly increasing map fitted on the training
    part (:func:`preprocessor`, robust standardisation by default; invertible, so the
    MI is unchanged), trains the critic on minibatches of the training part
    (:func:`pyro_mi.training.train`, validating every epoch, halving the learning rate
    on plateaus and stopping early on the validation bound) and evaluates the bound
    on the test part.

    Attributes:
        method: ``"mine"`` (DV with the moving-average gradient), ``"mine-f"``,
            ``"nwj"``, ``"infonce"`` or ``"xi"``.
        critic: a critic module ``critic(x, z) -> (...,)``, trained in place, or the name
            of one (:data:`CRITICS`: ``"joint"``, an MLP on [x, z], or ``"separable"``,
            f(x)ᵀg(z)); default: :func:`default_critic`.
        negatives: for the DV/ξ-type bounds in training, ``"shuffle"`` (one
            re-pairing per sample, B negatives; None: this) or ``"all"`` (all B(B-1) pairs of
            the batch). InfoNCE always scores all pairs of its batch (and takes none).
        xi: for ``"xi"``, a fixed ξ > 0, or None to optimise log ξ jointly with
            the critic (starting at ξ = 1/e, i.e. NWJ).
        max_steps, batch_size, lr: optimisation settings (batch_size is also the
            InfoNCE K at evaluation; it is capped at the size of the training part).
        hidden_sizes, embed_dim: sizes of the default critic.
        ema_rate: MINE's moving-average rate (1: the naive biased gradient).
        val_fraction, test_fraction: fractions of the samples held out for early
            stopping and for the reported bound (None: :data:`SPLITS` of the method, 0.2 and
            0.2, for InfoNCE 0.1 and 0.4). ``test_fraction=0`` reports the
            bound on the training samples, which is optimistic (it can exceed the
            true MI); a warning says so.
        eval_every: steps between validations (default: one epoch of the training part).
        patience: validations (epochs, by default) without improvement before stopping.
        lr_schedule: ``"plateau"`` (default: the learning rate halves after patience // 3 + 1
            validations without improvement), ``"cosine"`` or ``"constant"`` (see
            :func:`~pyro_mi.training.train`).
        eval_negatives: negatives per sample at evaluation (default: all pairs,
            capped at 2^18 scored pairs on the test part and 2^14 on the validation part,
            which is scored every epoch);
            for InfoNCE, K on the test part (default: the batch size or all test samples,
            at most :data:`INFONCE_TEST_NEGATIVES`, whichever scores higher on the
            validation part; validation during training uses the batch size).
        preprocess: the per-coordinate map of x and z (:data:`PREPROCESS`; see
            :func:`preprocessor`): ``"robust"`` (default), ``"standardize"``,
            ``"gaussianize"`` or ``"none"``.

    :meth:`fit` returns
        :class:`~pyro_mi.result.MIResult` with ``lower`` (nats) and
        ``lower_stderr``; ``upper`` is None. ``settings`` hold the sizes and
        options (``num_samples``, ``num_train``, ``num_val``, ``num_test``,
        ``xi``, ``stop_reason``...), ``diagnostics`` the critic, the :class:`TrainingLog`
        and ``train_lower`` (the bound on the training samples, at most :data:`EVALUATION_POINTS` of
        them, for comparison);
        ``warnings`` (list of str): evaluation on the training samples, heavy
        tails (:data:`HEAVY_TAIL_SHARE`), a bound below -0.1 or 2 se below 0 (with the
        share of the top 1% of negative terms), InfoNCE near its ceiling log K.

    Raises:
        ValueError: (when declared) an unknown method, negatives or preprocess, a bad ξ or ξ with
            another method, negatives with InfoNCE, a batch size below 2; (at :meth:`fit`) too few
            samples for the splits, fewer than :data:`MIN_TEST_SAMPLES` samples to report the bound on
            (the message says how many samples are needed in all).
    """

    method: str = "mine"
    critic: nn.Module | str | None = field(default=None, metadata=cli(
        "critic: an MLP on [x, z], f(x)ᵀg(z), or auto: both, the one with the higher validation bound kept "
        "(default: auto for infonce, joint for the others)", choices=CRITICS))
    negatives: str | None = field(default=None, metadata=cli(
        "negative pairs in training (default shuffle)", choices=NEGATIVES))
    xi: float | None = field(default=None, metadata=cli(
        "fixed xi for --method xi (default: optimised jointly)", type=float))
    max_steps: int = field(default=5000, metadata=cli("maximum training steps (default 5000)", type=int))
    batch_size: int = field(default=256, metadata=cli("minibatch size B; InfoNCE's K (default 256)", type=int))
    lr: float = field(default=1e-3, metadata=cli("Adam learning rate (default 1e-3)", type=float))
    hidden_sizes: tuple[int, ...] = (256, 256)
    embed_dim: int = 32
    ema_rate: float = 0.01
    val_fraction: float | None = field(default=None, metadata=cli(
        "fraction held out for early stopping (default 0.2; infonce 0.1)", type=float))
    test_fraction: float | None = field(default=None, metadata=cli(
        "fraction held out for the reported bound (default 0.2; infonce 0.4)", type=float))
    eval_every: int | None = None
    patience: int = field(default=20, metadata=cli(
        "epochs without a better validation bound before stopping (default 20)", type=int))
    lr_schedule: str = "plateau"
    eval_negatives: int | None = None
    preprocess: str = field(default="robust", metadata=cli(
        "strictly increasing per-coordinate map of x and z before training (default robust)", choices=PREPROCESS))

    def __post_init__(self):
        if self.method not in DUAL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(DUAL_METHODS)}")
        if self.negatives is not None and self.negatives not in NEGATIVES:
            raise ValueError(f"negatives must be one of {NEGATIVES}, got {self.negatives!r}")
        for name in ("negatives", "xi"):
            if getattr(self, name) is not None and name not in self.options_of(self.method):
                raise ValueError(f"{name} does not apply to method {self.method!r}")
        xi = self.xi
        if xi is not None and not (isinstance(xi, (int, float)) and xi > 0 and math.isfinite(xi)):
            raise ValueError(f"xi must be a positive number or None, got {xi!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an integer >= 2, got {self.batch_size!r}")

    @staticmethod
    def options_of(method: str) -> tuple[str, ...]:
        """The options that apply to ``method``: ``xi`` only to ``"xi"``, ``negatives`` to all but
        ``"infonce"`` (which scores all pairs of its batch)."""
        return tuple(f.name for f in dataclasses.fields(DualBound) if f.name != "method"
                     and not (f.name == "xi" and method != "xi") and not (f.name == "negatives" and method == "infonce"))

    def fit(self, x: torch.Tensor, z: torch.Tensor, progress: bool = True) -> MIResult:
        """Fits the critic on the training split of the paired samples and reports the bound.

        Args:
            x: (n, dx) and z: (n, dz) float tensors of paired samples (validated by
                :func:`pyro_mi.samples.estimate_mi_samples`); the critic is built on their device and
                dtype.
            progress: show a progress bar.

        Returns:
            :class:`~pyro_mi.result.MIResult`, see the class docstring.
        """
        return _fit(self, x, z, progress)


def fit_dual_bound(x: torch.Tensor, z: torch.Tensor, method: str = "mine", *, progress: bool = True,
                   **options) -> MIResult:
    """``DualBound(method, **options).fit(x, z, progress)``: the options by name."""
    return DualBound(method, **options).fit(x, z, progress)


def _fit(bound: DualBound, x: torch.Tensor, z: torch.Tensor, progress: bool) -> MIResult:
    """The fit of :class:`DualBound`."""
    method, critic, xi, max_steps, batch_size, lr = (bound.method, bound.critic, bound.xi, bound.max_steps,
                                                     bound.batch_size, bound.lr)
    negatives = "shuffle" if bound.negatives is None else bound.negatives
    val_fraction, test_fraction, eval_every, eval_negatives = (bound.val_fraction, bound.test_fraction,
                                                               bound.eval_every, bound.eval_negatives)
    n, dx = x.shape
    dz = z.shape[1]
    device, dtype = x.device, x.dtype
    default_val, default_test = SPLITS.get(method, SPLITS[None])
    val_fraction = default_val if val_fraction is None else val_fraction
    test_fraction = default_test if test_fraction is None else test_fraction
    _check_evaluation_size(n, val_fraction, test_fraction)
    tr, va, te = split_indices(n, val_fraction, test_fraction, device=device)
    x, z = preprocessor(bound.preprocess, x[tr])(x), preprocessor(bound.preprocess, z[tr])(z)
    xt, zt = x[tr], z[tr]
    n_train = xt.shape[0]
    B = min(batch_size, n_train)
    if eval_every is None:
        eval_every = max(1, n_train // B)  # one epoch
    if critic is None or isinstance(critic, str):
        candidates = default_critics(method, dx, dz, bound.hidden_sizes, bound.embed_dim, critic)
    elif callable(critic):
        check_critic(critic, dx, dz)
        candidates = [critic]
    else:
        raise TypeError(f"critic must be a callable module critic(x, z), got {type(critic).__name__}")
    if not va.numel():
        candidates = candidates[:1]  # nothing to choose by: the first (the separable one of "auto")

    def log_xi() -> float | None:
        return float(log_xi_mod.value.detach()) if method == "xi" else None

    steps_per_epoch, order = n_train // B, {}

    def objective(step: int) -> torch.Tensor:
        # minibatches of a random order of the training part, a new one each epoch (one permutation
        # per epoch, not per step: permuting millions of rows costs several training steps)
        epoch, k = divmod(step - 1, steps_per_epoch)
        if epoch not in order:
            order.clear()
            order[epoch] = torch.randperm(n_train, device=device)
        idx = order[epoch][k * B : (k + 1) * B]
        xb, zb = xt[idx], zt[idx]
        if method == "infonce":
            pair = getattr(critic, "pairwise", None) or (lambda a, b: critic(a.unsqueeze(1), b.unsqueeze(0)))
            return infonce_bound(pair(xb, zb))
        t_pos = critic(xb, zb)
        if negatives == "all":
            scores = critic.pairwise(xb, zb) if hasattr(critic, "pairwise") else critic(xb[:, None], zb[None])
            t_neg = scores[~torch.eye(B, dtype=torch.bool, device=device)]
        else:
            t_neg = critic(xb, zb.roll(1, 0))  # the batch is in random order: a random re-pairing
        if method == "mine":
            return ema.surrogate(t_pos, t_neg)
        if method == "xi":
            return xi_bound(t_pos, t_neg, log_xi_mod.value)
        return nwj_bound(t_pos, t_neg)

    def values_on(idx: torch.Tensor, seed: int, budget: int, infonce_k: int):
        g = torch.Generator().manual_seed(seed)
        return _evaluate(
            method, critic, x[idx], z[idx], log_xi=log_xi(), num_shifts=_shifts(idx.numel(), eval_negatives, budget),
            num_negatives=infonce_k, generator=g,
        )

    # validation (and the training-part comparison) on at most EVALUATION_POINTS of their random
    # splits: a standard error far below the differences they decide, at a cost that does not grow with n
    va_eval = va[:EVALUATION_POINTS]
    validate = (lambda: float(values_on(va_eval, 1, 1 << 14, B)[0].mean())) if va.numel() else None
    fitted = []  # (critic, log ξ, training log) of every candidate
    for critic in candidates:  # the closures above read the current candidate
        if isinstance(critic, nn.Module):
            critic.to(device=device, dtype=dtype)
        log_xi_mod = _LogXi(-1.0 if xi is None else math.log(xi), method == "xi" and xi is None, dtype, device)
        ema = MovingAverage(bound.ema_rate)
        modules = [m for m in (critic, log_xi_mod) if isinstance(m, nn.Module)]
        log: TrainingLog = train(
            modules, objective, validate=validate, max_steps=max_steps, lr=lr, eval_every=eval_every,
            patience=bound.patience, lr_schedule=bound.lr_schedule, progress=progress,
            desc=f"fit critic ({method}, {type(critic).__name__})",
        )
        fitted.append((critic, log_xi_mod, log))
    def score(fit) -> float:  # a missing or non-finite validation bound never wins
        v = fit[2].best_value
        return v if v is not None and math.isfinite(v) else -math.inf

    # the highest validation bound; the test split, used by none of them, keeps the bound honest
    critic, log_xi_mod, log = max(fitted, key=score)
    modules = [m for m in (critic, log_xi_mod) if isinstance(m, nn.Module)]
    test_k = B
    with torch.no_grad():
        for m in modules:
            m.eval()
        if method == "infonce":
            test_k = _infonce_test_k(eval_negatives, B, te.numel(), va.numel(), lambda k: values_on(va, 1, 0, k)[0])
        train_vals, tail_share = values_on(tr[:EVALUATION_POINTS] if te.numel() else tr, 2, 1 << 16, B)
        notes = []
        if te.numel():
            (vals, tail_share), evaluated_on = values_on(te, 3, 1 << 18, test_k), "test split"
        else:
            notes.append(
                "test_fraction=0: the bound is evaluated on the samples the critic was fitted to, "
                "which is optimistic (it can exceed the true MI); hold out a test split for an honest bound"
            )
            warnings.warn(notes[-1], stacklevel=2)
            vals, evaluated_on = train_vals, "training samples (optimistic)"
    carried = "" if tail_share is None else f"the top 1% of the negative pairs carry {tail_share:.0%} of the mean of e^T"
    if tail_share is not None and tail_share > HEAVY_TAIL_SHARE:
        notes.append(
            f"heavy tails: {carried}, so the bound and its stderr rest on a handful of pairs; "
            "use more samples, a smaller critic or preprocess='gaussianize'"
        )
    mean, se = float(vals.mean()), float(vals.std() / math.sqrt(vals.numel()))
    if not (mean >= -0.1 and mean + 2 * se >= 0):  # also NaN: e^T overflowed
        notes.append(
            f"the bound is negative ({mean:.3f} ± {se:.3f} nats), worse than the constant critic's 0: "
            "the critic does not carry over from the training to the held-out samples"
            + (f" ({carried})" if carried else "") + "; the MI is only known to be >= 0"
        )
    settings = {
        "num_samples": n,
        "num_train": int(tr.numel()),
        "num_val": int(va.numel()),
        "num_test": int(te.numel()),
        "batch_size": B,
        "negatives": "all" if method == "infonce" else negatives,
        "max_steps": max_steps,
        "steps": log.steps,
        "stop_reason": log.stop_reason,
        "lr": lr,
        "lr_schedule": bound.lr_schedule,
        "preprocess": bound.preprocess,
        "critic": type(critic).__name__,
        "critics_tried": {type(c).__name__: lg.best_value for c, _, lg in fitted},
        "evaluated_on": evaluated_on,
    }
    if method == "mine":
        settings["ema_rate"] = bound.ema_rate
    if method == "xi":
        settings["xi"] = math.exp(log_xi())
        settings["xi_optimised"] = xi is None
    if method == "infonce":
        settings["num_negatives"] = min(test_k if te.numel() else B, vals.numel())
        settings["log_num_negatives"] = math.log(settings["num_negatives"])
        if float(vals.mean()) > settings["log_num_negatives"] - 0.5:
            notes.append(
                f"InfoNCE is within 0.5 nats of its ceiling log K = {settings['log_num_negatives']:.3f}; "
                "the MI may be much larger (a larger batch size raises the ceiling)"
            )
    return MIResult(
        method,
        lower_per_point=vals.detach(),
        upper_per_point=None,
        settings=settings,
        diagnostics={"critic": critic, "training": log, "train_lower": float(train_vals.mean())},
        warnings=notes,
    )


def _infonce_test_k(eval_negatives: int | None, batch: int, n_test: int, n_val: int, val_values) -> int:
    """InfoNCE's K on the test split: ``eval_negatives``, or of the training batch size and
    min(n_test, INFONCE_TEST_NEGATIVES), the one that the validation split prefers
    (``val_values(K)`` -> (n_val,)): it compares K = batch with K = min(n_val, n_test,
    INFONCE_TEST_NEGATIVES), its own largest K, standing in for the larger one. A larger K raises
    the ceiling log K but, for a critic fitted at the batch size, can lower the bound (it weighs
    the tails of e^T more, as DV does); choosing on the validation split keeps the test bound honest."""
    if eval_negatives is not None:
        return min(n_test, eval_negatives)
    big = min(n_test, INFONCE_TEST_NEGATIVES)
    probe = min(big, n_val)
    if probe <= batch:
        return min(n_test, batch)
    return big if float(val_values(probe).mean()) > float(val_values(batch).mean()) else min(n_test, batch)


def _check_evaluation_size(n: int, val_fraction, test_fraction) -> None:
    """Raises ValueError when the split of n samples leaves fewer than MIN_TEST_SAMPLES to report on
    (the test part, or the training part when ``test_fraction`` is 0); bad fractions are left to
    :func:`~pyro_mi.training.split_indices`."""
    if not all(isinstance(f, (int, float)) and 0 <= f < 1 for f in (val_fraction, test_fraction)):
        return
    if test_fraction > 0:
        have, what, fraction = round(n * test_fraction), "test", test_fraction
    else:
        have, what, fraction = n - round(n * val_fraction), "training (test_fraction=0)", 1 - val_fraction
    if have < MIN_TEST_SAMPLES:
        need = math.ceil(round(MIN_TEST_SAMPLES / fraction, 6))  # round: 1 - 0.9 is not 0.1
        raise ValueError(
            f"too few samples: {n} samples leave {have} {what} samples to report the bound on, and a bound "
            f"on fewer than {MIN_TEST_SAMPLES} (MIN_TEST_SAMPLES) has an unreliable value and stderr; "
            f"give at least {need} samples in all"
        )


def _shifts(n: int, eval_negatives: int | None, budget: int) -> int:
    if n < 2:
        raise ValueError(f"need at least 2 samples to form negative pairs, got {n}")
    if eval_negatives is None:
        return max(1, min(n - 1, budget // n))
    if isinstance(eval_negatives, bool) or not isinstance(eval_negatives, int) or eval_negatives < 1:
        raise ValueError(f"eval_negatives must be a positive integer, got {eval_negatives!r}")
    return min(n - 1, eval_negatives)
