"""A per-point Gaussian fit that starts and preconditions AIS (``AIS(precondition=...)``).

For each data point x_i, a full-rank Gaussian N(m_i, L_i L_i^T) on the packed unconstrained z is
fitted to p(z | x_i) by maximising the reparameterised ELBO (the full-rank Gaussian of ADVI,
Kucukelbir et al. 2017), each point on its own, all points in one batch. The AIS path then runs
in the whitened coordinates w = L_i^{-1} (z - m_i): HMC there is HMC with the mass matrix
(L_i L_i^T)^{-1} in z (Neal 2011, sec. 4.1, "linear transformations"), so the posterior's scales
and linear correlations, which a funnel's or a heavy tail's points make extreme and different from
point to point, no longer set the step size. pi0 is a defensive mixture (Hesterberg 1995)
(1 - a) N(w; 0, I) + a q(z(w)|x) |L_i| of the fit and the proposal q.

**The bounds stay exact.** The map z -> w is a fixed bijection per point, chosen from x_i (and
random numbers of its own) only, before any bound-bearing chain starts: the target p(x_i, z(w))
|L_i| has the normaliser p(x_i), the simulated z_i maps to an exact posterior draw of it, and pi0
is a normalised density; so every per-point bound of Brekelmans et al. (2022, eq. 13–17) holds
whatever the fit reached. A poor fit costs tightness only; the defensive component keeps the
weights of a point whose fit failed near what the proposal alone would give.

The fit starts at each point's posterior mode, found by damped Newton steps from the proposal's
mean (:func:`laplace`; Newton's steps do not depend on the scale of each direction, so a point
whose posterior sits thousands of its own widths from where the proposal put it gets there), with
the Laplace approximation's covariance (for D <= :data:`FULL_RANK_MAX_DIM`). The ELBO then takes
``rounds`` of ``steps`` Adam steps (the learning rate decaying linearly to 0 within a round, so
that the fit ends where the gradient noise lets it settle), each round in the frame the one before
ended in (a re-whitening: its parameters start at N(0, I) there), with more rounds for a point
whose fit still moves.

Where the model has a second parameterisation (:func:`alternative`: the model as written where
``reparam="auto"`` non-centred some site, or a latent its author non-centred by hand, centred),
:func:`precondition` also chooses each point's: it fits the other too, and a point runs it where that
fit is the better and near exact (:class:`PerPointDensity`); the choice, like the fit, depends on x_i
only.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pyro
import torch
from tqdm.auto import tqdm

from ..density import Data, ModelDensity
from ..density.centring import CentredDensity, find_centring
from ..proposal import log_prob_given, proposal_for_points, proposal_from_point

#: above this latent dimension the fit is diagonal (a full-rank one holds N D^2 numbers)
FULL_RANK_MAX_DIM = 64
#: the proposal's weight a in pi0's defensive mixture (chosen on eight schools against 0.03 and 0.2: the docs'
#: tuning page)
PROPOSAL_WEIGHT = 0.1
#: draws of the proposal whose mean and standard deviation start the fit
START_DRAWS = 64
#: draws of a fit that estimate its ELBO, which chooses a point's parameterisation (:func:`precondition`): the
#: :func:`alternative` (the model as written, or centred) where its fit's ELBO is the higher and its log weights
#: spread by less than WRITTEN_MAX_SPREAD nats (standard deviation: a fit that close makes AIS exact; chosen on eight schools and baseball, the docs' tuning page)
ELBO_DRAWS = 64
WRITTEN_MAX_SPREAD = 1.0
#: Adam's learning rate, in the current round's whitened units
LEARNING_RATE = 0.05
#: damped Newton steps to each point's posterior mode (:func:`laplace`), where the fit starts: this many
#: for every point, and again for a point whose log p(x, z) still rose by NEWTON_TOL nats, up to NEWTON_MAX_STEPS
NEWTON_STEPS = 30
NEWTON_TOL = 0.1
NEWTON_MAX_STEPS = 300
#: a fit whose mean moved by more than this many of its standard deviations in a round is not done
MOVED = 1.0


def _affine(loc: torch.Tensor, tril: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """loc + tril @ w for w (..., N, D) and per-point loc (N, D), tril (N, D, D) (one batched product of each
    point's matrix with all its vectors: broadcasting tril over w's leading dims would copy it per vector)."""
    return loc + torch.einsum("nij,...nj->...ni", tril, w)


def start_of(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a fit's search for the mode starts: the mean (N, D) and a diagonal scale_tril (N, D, D) of draws
    (S, N, D) (N(0, I) for a point whose draws are not finite)."""
    loc, tril = draws.mean(0), torch.diag_embed(draws.std(0).clamp_min(1e-3))
    bad = ~torch.isfinite(loc).all(-1) | ~torch.isfinite(tril).all(-1).all(-1)
    eye = torch.eye(loc.shape[-1], dtype=loc.dtype, device=loc.device)
    return torch.where(bad[:, None], 0.0, loc), torch.where(bad[:, None, None], eye, tril)


def fit_point_gaussians(density: ModelDensity, x: Data, start: tuple[torch.Tensor, torch.Tensor], *, rounds: int,
                        steps: int, max_rounds: int | None = None, particles: int = 8,
                        progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-point Gaussian approximations of p(z | x_i): from each point's mode and Laplace covariance
    (:func:`laplace`), fitted by the ELBO (see the module).

    Args:
        density: the model's density; x: its observed values for N points.
        start: (loc (N, D), scale_tril (N, D, D)) where the search for the mode starts (e.g.
            :func:`start_of` a proposal's draws); scale_tril stands where the Laplace covariance fails.
        rounds, steps: every point gets ``rounds`` re-whitened rounds of ``steps`` Adam steps.
        max_rounds: a point whose mean still moved by more than :data:`MOVED` of its own standard
            deviations in its last round gets more rounds, up to this many in all (default ``rounds``).
        particles: reparameterised draws per point and step.
        progress: a tqdm bar over the rounds' steps.

    Draws through torch's global RNG (seed it for a reproducible fit).

    Returns:
        (loc (N, D), scale_tril (N, D, D)), detached; full-rank for D <= :data:`FULL_RANK_MAX_DIM`,
        else diagonal. A point whose round made its parameters non-finite keeps the values it had
        at the start of that round.
    """
    loc, tril = start
    if loc.shape[-1] <= FULL_RANK_MAX_DIM:
        loc, tril = laplace(density, x, loc, tril)
    loc, tril = loc.clone(), tril.clone()
    active = torch.arange(loc.shape[0], device=loc.device)
    bar = tqdm(total=rounds * steps, desc="per-point fit", unit="step", leave=False, disable=not progress)
    for r in range(max(rounds, max_rounds or rounds)):
        if r >= rounds:  # a round more for the points still moving
            bar.total += steps
            bar.refresh()
        everyone = active.numel() == loc.shape[0]
        d, xs = (density, x) if everyone else (density.for_points(active), {k: v[active] for k, v in x.items()})
        new_loc, new_tril, moved = _round(d, xs, loc[active], tril[active], steps, particles)
        loc[active], tril[active] = new_loc, new_tril
        bar.update(steps)
        if r + 1 >= rounds:
            active = active[moved > MOVED]
            if active.numel() == 0:
                break
    bar.close()
    return loc, tril


def log_weights(density, x: Data, loc: torch.Tensor, tril: torch.Tensor, draws: int = ELBO_DRAWS) -> torch.Tensor:
    """log p(x_i, z) - log N(z; loc_i, L_i L_i^T) at ``draws`` draws of each point's fit (draws, N), nats:
    their mean is the fit's ELBO, their spread how far the fit is from p(z | x_i). Global RNG."""
    eps = torch.randn((draws,) + loc.shape, dtype=loc.dtype, device=loc.device)
    with torch.no_grad(), pyro.validation_enabled(False):
        lp, ll = density.log_terms(x, _affine(loc, tril, eps))
    log_q = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(-1) - torch.diagonal(tril, dim1=-2, dim2=-1).log().sum(-1)
    return lp + ll - log_q


def precondition(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *, rounds: int, steps: int,
                 max_rounds: int | None = None, progress: bool = False):
    """The whitened coordinates AIS runs in (see the module): each point's fit, and, where the density has
    an :func:`alternative` parameterisation, each point's: the alternative where its fit is both the
    better (a higher ELBO) and near exact (log weights spread by less than :data:`WRITTEN_MAX_SPREAD`),
    else the density's. Centring suits a point whose data pin its effects down, non-centring one whose
    data leave them to the prior (Papaspiliopoulos, Roberts & Sköld 2007); eight schools' simulated
    points are of both kinds. The choice is made from x_i and the fits' own
    random numbers only, so every bound holds.

    Args:
        density, proposal, x: the run's; z (N, D): the simulated latents (of ``density``).
        rounds, steps, max_rounds, progress: of :func:`fit_point_gaussians`.

    Returns:
        (the :class:`WhitenedDensity`, the :class:`WhitenedProposal` pi0, z in its coordinates (N, D),
        the indices of the points that run the :class:`Alternative` (a long tensor, maybe empty), the
        alternative or None).
    """
    with torch.no_grad():
        draws = proposal.rsample(x, START_DRAWS)[0].detach()  # (S, N, D)
    fit = dict(rounds=rounds, steps=steps, max_rounds=max_rounds, progress=progress)
    loc, tril = fit_point_gaussians(density, x, start_of(draws), **fit)
    alt = alternative(density, x)
    if alt is None:
        wd = WhitenedDensity(density, loc, tril)
        return wd, WhitenedProposal(wd, proposal), wd.w_of(z), torch.zeros(0, dtype=torch.long), None
    # the other one is fitted from two starts, the proposal's draws and the first fit's (which found each
    # point's scale where the proposal may not have: eight schools' tau ~ e^12), both mapped, all 2N fits in
    # one batch, and keeps the one with the higher ELBO; no rounds past ``rounds``: a fit still moving then is
    # not near exact, and would not be chosen
    other, n = alt.density, z.shape[0]
    with torch.no_grad():
        fitted = _affine(loc, tril, torch.randn_like(draws))
        start = tuple(torch.cat(p) for p in zip(*(start_of(alt.to(density, other, d)) for d in (draws, fitted))))
    twice = torch.arange(n, device=z.device).repeat(2)
    x2 = {k: v.repeat((2,) + (1,) * (v.dim() - 1)) for k, v in x.items()}
    o_loc, o_tril = fit_point_gaussians(other.for_points(twice), x2, start, **dict(fit, max_rounds=rounds))
    lw_other = log_weights(other.for_points(twice), x2, o_loc, o_tril).unflatten(1, (2, n))  # (S, 2, N)
    elbo = lw_other.mean(0)  # (2, N)
    second = ((elbo[1] > elbo[0]) | (elbo[0].isnan() & ~elbo[1].isnan())).long()  # (N,): a NaN ELBO loses
    lw_other = lw_other.gather(1, second.expand(lw_other.shape[0], 1, n)).squeeze(1)
    o_loc, o_tril = (t.unflatten(0, (2, n))[second, twice[:n]] for t in (o_loc, o_tril))
    lw = log_weights(density, x, loc, tril)
    good = torch.isfinite(lw_other).all(0) & (lw_other.std(0) < WRITTEN_MAX_SPREAD)
    chosen = good & ~(lw_other.mean(0) <= lw.mean(0))  # (N,): the other (NaN ELBO of the density's: not chosen over)
    loc, tril = torch.where(chosen[:, None], o_loc, loc), torch.where(chosen[:, None, None], o_tril, tril)
    wd = WhitenedDensity(PerPointDensity(density, other, chosen, alt.to), loc, tril)
    z = torch.where(chosen[:, None], alt.to(density, other, z), z)
    # pi0's defensive component is the proposal's, of the density's latents: not mixed in where the other runs
    weight = torch.where(chosen, 0.0, PROPOSAL_WEIGHT)
    return wd, WhitenedProposal(wd, proposal, weight), wd.w_of(z), torch.nonzero(chosen).squeeze(-1).cpu(), alt


class Alternative(NamedTuple):
    """A second parameterisation of a density's latents, which :func:`precondition` may choose point by
    point: its ``density`` (same latent dimension, same p(x_i)), ``to(density, other, z)`` mapping z of
    the first to the second (a bijection), the ``key`` of ``diagnostics`` that lists the points that
    run it, and what they run, ``described`` for the result's note."""

    density: object
    to: Callable
    key: str
    described: str


def alternative(density: ModelDensity, x: Data) -> Alternative | None:
    """The model as written where ``reparam="auto"`` non-centred some site; else a latent the author
    non-centred by hand, centred (:mod:`~pyro_mi.density.centring`); else None."""
    written = density.as_written()
    if written is not None:
        return Alternative(written, lambda d, o, z: d.written_z(o, z), "points_as_written",
                           f"the model as written, the others with {list(density.decentred_sites)} non-centred")
    centring = find_centring(density)
    if centring is None:
        return None
    return Alternative(CentredDensity(density, centring, x), lambda d, o, z: o.v_of(z), "points_centred",
                       f"{centring.latent!r} centred (in its place {centring.observed!r}'s {centring.parameter}, "
                       f"affine in it with a scale that depends on the other latents), the others as written")


def _log_joint_derivatives(density, x, z: torch.Tensor, hessian: bool):
    """log p(x, z) (N,), its gradient (N, D) and, with ``hessian``, its Hessian (N, D, D) at z (N, D), each
    point's own (the points are independent, so a backward pass per latent dimension gives every
    point's Hessian row: the D passes batched in one, or one by one where an op of the model has no
    batched backward)."""
    z = z.detach().unsqueeze(0).requires_grad_()
    with torch.enable_grad(), pyro.validation_enabled(False):
        lp, ll = density.log_terms(x, z)
        f = (lp + ll)[0]
        (g,) = torch.autograd.grad(f.sum(), z, create_graph=hessian)
        h = _hessian_rows(g, z) if hessian else None
    return f.detach(), g[0].detach(), h


def _hessian_rows(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(N, D, D): row j of point n is the gradient in z (1, N, D) of g[0, n, j], g (1, N, D) its gradient."""
    D = z.shape[-1]
    try:
        one_hot = torch.eye(D, dtype=g.dtype, device=g.device).reshape(D, 1, 1, D).expand((D,) + g.shape)
        (h,) = torch.autograd.grad(g, z, grad_outputs=one_hot, is_grads_batched=True, retain_graph=True)
        return h[:, 0].transpose(0, 1)
    except RuntimeError:  # no batching rule for an op's backward
        return torch.stack([torch.autograd.grad(g[0, :, j].sum(), z, retain_graph=True)[0][0] for j in range(D)], -2)


def _newton(density, x, z, f, g, h, damping, steps: int):
    """``steps`` damped Newton steps (Levenberg–Marquardt) on every point of (density, x) from z, with log p
    f (N,), its gradient g and Hessian h there: a step that does not raise f is refused and its damping
    raised. Returns the new (z, f, g, h, damping)."""
    eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
    for _ in range(steps):
        a = -h + damping[:, None, None] * (eye + torch.diag_embed(torch.diagonal(-h, dim1=-2, dim2=-1).abs()))
        chol, info = torch.linalg.cholesky_ex(a)
        step = torch.cholesky_solve(g.unsqueeze(-1), chol).squeeze(-1)
        z_new = torch.where((info == 0)[:, None] & torch.isfinite(step).all(-1)[:, None], z + step, z)
        f_new, g_new, h_new = _log_joint_derivatives(density, x, z_new, True)
        better = torch.isfinite(f_new) & (f_new > f) & torch.isfinite(g_new).all(-1) & torch.isfinite(h_new).all(-1).all(-1)
        z = torch.where(better[:, None], z_new, z)
        f, g = torch.where(better, f_new, f), torch.where(better[:, None], g_new, g)
        h = torch.where(better[:, None, None], h_new, h)
        damping = torch.where(better, damping / 3, damping * 5).clamp(1e-8, 1e8)
    return z, f, g, h, damping


def laplace(density: ModelDensity, x: Data, loc: torch.Tensor, tril: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each point's posterior mode by damped Newton steps from ``loc`` (:data:`NEWTON_STEPS` for every
    point, then rounds of as many for the points whose log p(x, z) still rose by more than
    :data:`NEWTON_TOL` nats, up to :data:`NEWTON_MAX_STEPS`), and the Laplace approximation there:
    (mode (N, D), Cholesky factor of the inverse negative Hessian (N, D, D)). Newton's steps do not
    depend on the scale of each direction, so a point whose posterior sits a thousand of its own
    widths from the start gets there. A point whose Hessian is not negative definite at the end keeps
    ``tril``."""
    N, D = loc.shape
    eye = torch.eye(D, dtype=loc.dtype, device=loc.device)
    z, (f, g, h) = loc.clone(), _log_joint_derivatives(density, x, loc, True)
    damping = torch.full((N,), 1e-3, dtype=loc.dtype, device=loc.device)
    active = torch.arange(N, device=loc.device)
    for _ in range(NEWTON_MAX_STEPS // NEWTON_STEPS):
        d, xs = (density, x) if active.numel() == N else (density.for_points(active), {k: v[active] for k, v in x.items()})
        before = f[active]
        z[active], f[active], g[active], h[active], damping[active] = _newton(
            d, xs, z[active], f[active], g[active], h[active], damping[active], NEWTON_STEPS)
        active = active[f[active] - before > NEWTON_TOL]
        if active.numel() == 0:
            break
    chol, info = torch.linalg.cholesky_ex(-h)
    inverse = torch.linalg.solve_triangular(torch.where((info == 0)[:, None, None], chol, eye), eye, upper=False)
    cov_tril, info2 = torch.linalg.cholesky_ex(inverse.transpose(-1, -2) @ inverse)  # of (-H)^-1
    ok = (info == 0) & (info2 == 0) & torch.isfinite(cov_tril).all(-1).all(-1)
    return z, torch.where(ok[:, None, None], cov_tril, tril)


def _round(density, x, loc, tril, steps: int, particles: int):
    """One round of the fit in the frame (loc, tril), starting at N(0, I) in it: the new (loc, tril) and how
    far the mean moved, in the frame's units (N,)."""
    N, D = loc.shape
    lower = torch.tril(torch.ones(D, D, dtype=loc.dtype, device=loc.device), -1) if D <= FULL_RANK_MAX_DIM else 0.0
    shift = torch.zeros(N, D, dtype=loc.dtype, device=loc.device, requires_grad=True)
    raw = torch.zeros(N, D, D, dtype=loc.dtype, device=loc.device, requires_grad=True)
    opt = torch.optim.Adam([shift, raw], lr=LEARNING_RATE)
    for step in range(steps):
        opt.param_groups[0]["lr"] = LEARNING_RATE * (1 - step / steps)  # decays to 0: the last step's noise is small
        log_diag = torch.diagonal(raw, dim1=-2, dim2=-1)
        inner = torch.diag_embed(log_diag.exp()) + raw * lower
        eps = torch.randn((particles, N, D), dtype=loc.dtype, device=loc.device)
        with pyro.validation_enabled(False):  # a draw outside the support gets -inf, not an error
            lp, ll = density.log_terms(x, _affine(loc, tril, _affine(shift, inner, eps)))
        elbo = (lp + ll).mean(0) + log_diag.sum(-1)  # + the entropy, up to a constant: (N,)
        opt.zero_grad()
        torch.where(torch.isfinite(elbo), -elbo, 0.0).sum().backward()
        with torch.no_grad():  # a point whose draws went non-finite does not move on this step
            for p in (shift, raw):
                p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
        opt.step()
    with torch.no_grad():
        inner = torch.diag_embed(torch.diagonal(raw, dim1=-2, dim2=-1).exp()) + raw * lower
        new_loc, new_tril = _affine(loc, tril, shift), tril @ inner
        keep = torch.isfinite(new_loc).all(-1) & torch.isfinite(new_tril).all(-1).all(-1) \
            & (torch.diagonal(new_tril, dim1=-2, dim2=-1) > 0).all(-1)
        moved = torch.where(keep, shift.norm(dim=-1), 0.0)
        return (torch.where(keep[:, None], new_loc, loc), torch.where(keep[:, None, None], new_tril, tril), moved)


class PerPointDensity:
    """Each point's density in the parameterisation chosen for it: ``other``'s (an
    :class:`Alternative`'s) where ``chosen``, else ``density``'s (the two have the same latent dimension
    and the same p(x_i)). Everything but the log densities is ``density``'s.

    Args:
        density: the :class:`ModelDensity`; other: the alternative's density; chosen (N,) bool;
            to: the alternative's map ``to(density, other, z)``.
    """

    def __init__(self, density: ModelDensity, other, chosen: torch.Tensor, to: Callable):
        self.density, self.other, self.chosen, self.to = density, other, chosen, to
        self._parts = {}  # n -> [(the density of those of the first n points it scores, their indices)]

    def parts(self, n: int) -> list:
        """Each parameterisation's density for its points among the first n, and their indices (read once
        per n: the sampler's loop does not wait on the device)."""
        if n not in self._parts:
            chosen = self.chosen[:n]
            self._parts[n] = [(d.for_points(i), i) for d, i in ((self.density, torch.nonzero(~chosen).squeeze(-1)),
                                                                 (self.other, torch.nonzero(chosen).squeeze(-1)))
                              if i.numel()]
        return self._parts[n]

    def log_terms(self, x: Data, z: torch.Tensor, likelihood: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(z), log p(x | z)), each (..., n), for z (..., n, D) of the first n points, nats."""
        lp, ll = z.new_zeros(z.shape[:-1]), z.new_zeros(z.shape[:-1])
        for d, index in self.parts(z.shape[-2]):
            terms = d.log_terms({k: v[index] for k, v in x.items()}, z[..., index, :], likelihood)
            lp, ll = lp.index_copy(-1, index, terms[0]), ll.index_copy(-1, index, terms[1])
        return lp, ll

    def constrained(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """z (*S, n, D) -> the model's sites as written ``{site: (*S, n, *shape)}``, at every point."""
        chosen = self.chosen[: z.shape[-2]]
        return self.other.constrained(torch.where(chosen[:, None], z, self.to(self.density, self.other, z)))

    def from_point(self, start: int) -> "PerPointDensity":
        return PerPointDensity(self.density.from_point(start), self.other.from_point(start), self.chosen[start:],
                               self.to)

    def for_points(self, index: torch.Tensor) -> "PerPointDensity":
        return PerPointDensity(self.density.for_points(index), self.other.for_points(index), self.chosen[index],
                               self.to)

    def __getattr__(self, name):  # sizes, data checks and the model are the density's
        if name == "density":
            raise AttributeError(name)
        return getattr(self.density, name)


class WhitenedDensity:
    """``density`` in the whitened coordinates w = L_i^{-1} (z - m_i) of each point: log p(z(w)) +
    log |L_i| and log p(x_i | z(w)). Everything else (data checks, sizes, the model) is the
    density's; :meth:`constrained` maps w to the model's constrained values.

    Args:
        density: the :class:`ModelDensity`; loc (N, D), scale_tril (N, D, D): the per-point map.
    """

    def __init__(self, density: ModelDensity, loc: torch.Tensor, scale_tril: torch.Tensor):
        self.density, self.loc, self.scale_tril = density, loc, scale_tril
        self.log_det = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log().sum(-1)  # (N,)

    def rows(self, n: int):
        """loc, scale_tril and log |L| of the first ``n`` points (a block's x may stop before the end)."""
        return self.loc[:n], self.scale_tril[:n], self.log_det[:n]

    def z_of(self, w: torch.Tensor) -> torch.Tensor:
        """z (..., n, D) of w (..., n, D), for the first n points."""
        loc, tril, _ = self.rows(w.shape[-2])
        return _affine(loc, tril, w)

    def w_of(self, z: torch.Tensor) -> torch.Tensor:
        """w (..., n, D) of z (..., n, D), for the first n points."""
        loc, tril, _ = self.rows(z.shape[-2])
        return torch.linalg.solve_triangular(tril, (z - loc).unsqueeze(-1), upper=False).squeeze(-1)

    def log_terms(self, x: Data, w: torch.Tensor, likelihood: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(log p(z(w)) + log |L|, log p(x | z(w))), each (..., n), nats."""
        lp, ll = self.density.log_terms(x, self.z_of(w), likelihood)
        return lp + self.rows(w.shape[-2])[2], ll

    def constrained(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.density.constrained(self.z_of(w))

    def from_point(self, start: int) -> "WhitenedDensity":
        return WhitenedDensity(self.density.from_point(start), self.loc[start:], self.scale_tril[start:])

    def for_points(self, index: torch.Tensor) -> "WhitenedDensity":
        return WhitenedDensity(self.density.for_points(index), self.loc[index], self.scale_tril[index])

    def __getattr__(self, name):  # sizes, data checks and the model are the density's
        if name == "density":  # not yet set (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.density, name)


class WhitenedProposal:
    """pi0 in the whitened coordinates of a :class:`WhitenedDensity`: (1 - a_i) N(w; 0, I) +
    a_i q(z(w) | x_i) |L_i| (a defensive mixture with the proposal q; Hesterberg 1995).

    Args:
        whitened: the :class:`WhitenedDensity`; proposal: q; weight: a in [0, 1), one for all points or
            one per point (N,).
    """

    def __init__(self, whitened: WhitenedDensity, proposal, weight: float | torch.Tensor = PROPOSAL_WEIGHT):
        self.whitened, self.proposal = whitened, proposal
        self.weight = torch.as_tensor(weight, dtype=whitened.loc.dtype, device=whitened.loc.device).expand(
            whitened.loc.shape[:1])
        self.mixed = bool(self.weight.any())  # read here, not in the sampler's loop

    def log_prob_given(self, x: Data) -> Callable:
        """log pi0(w) for the fixed x: ``f(w (..., N, D), log_prior (..., N)) -> (..., N)``, where
        ``log_prior`` is the whitened density's log p(z(w)) + log |L|."""
        log_q, wd = log_prob_given(self.proposal, x), self.whitened

        def log_prob(w, log_prior):
            gauss = torch.distributions.Normal(0.0, 1.0).log_prob(w).sum(-1)
            if not self.mixed:
                return gauss
            a = self.weight[: w.shape[-2]]
            log_det = wd.rows(w.shape[-2])[2]
            mixed = log_q(wd.z_of(w), log_prior - log_det) + log_det
            return torch.where(a > 0, torch.logaddexp(torch.log1p(-a) + gauss, a.log() + mixed), gauss)

        return log_prob

    def log_prob(self, w: torch.Tensor, x: Data) -> torch.Tensor:
        return self.log_prob_given(x)(w, self.whitened.log_terms(x, w, likelihood=False)[0])

    def rsample(self, x: Data, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """w ~ pi0: returns w (K, N, D) and log pi0(w) (K, N)."""
        loc = self.whitened.rows(len(next(iter(x.values()))))[0]
        w = torch.randn((num_samples,) + loc.shape, dtype=loc.dtype, device=loc.device)
        if self.mixed:
            from_q = torch.rand(w.shape[:-1], device=w.device) < self.weight[: loc.shape[0]]
            w = torch.where(from_q.unsqueeze(-1), self.whitened.w_of(self.proposal.rsample(x, num_samples)[0].detach()), w)
        return w, self.log_prob(w, x)

    def from_point(self, start: int) -> "WhitenedProposal":
        return WhitenedProposal(self.whitened.from_point(start), proposal_from_point(self.proposal, start),
                                self.weight[start:])

    def for_points(self, index: torch.Tensor) -> "WhitenedProposal":
        return WhitenedProposal(self.whitened.for_points(index), proposal_for_points(self.proposal, index),
                                self.weight[index])
