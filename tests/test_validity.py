"""Paired exact-validity suite: every bound, both sides, against the exact per-point MI.

On models whose marginal log p(x) is exact (:data:`models.EXACT_MODELS`), each simulated
point (x_i, z_i) ~ p(x, z) has the exact per-point MI

    m_i = log p(x_i | z_i) - log p(x_i),        E[m_i] = I(x; z).

A method's per-point MI lower values l_i and upper values u_i on the *same* points must
satisfy E[l_i - m_i] <= 0 and E[m_i - u_i] <= 0. The paired differences remove the
spread of m_i over points (its sd is 0.7-2.2 nats here), so their standard error is a few
millinats at N of several hundred, and a bias of that size shows (DESIGN.md, Testing).
Each side is tested as ``mean(d) <= 3 se`` with ``se = std(d) / sqrt(N)``
(:func:`assert_paired_validity`). The AIS forward weights are also tested as unbiased
estimators of p(x): E[w_fwd / p(x)] = 1 (:func:`test_forward_weights_are_unbiased`).

Methods run at their defaults (no ``adapt`` or ``precondition`` argument: whatever the default
mode is, it must give bounds; for ``im-ais``, ``cr-ais`` and ``bdmc`` with ``precondition="none"``,
the per-point fit being the same for every estimator) and at T = num_steps in {10, 100, 1000} (at
a T other than the default with ``precondition="none"``, the chains starting from the proposal
itself); BA and IWAE at their default
K, at K = 10 and, on the two-site and Gamma-Poisson models, at K = 10^4. Every model runs with the
prior as pi0; the linear-Gaussian model also with a fitted GaussianEncoder (the default
proposal of ``estimate_mi``). The one case left out is T = 1000 with the prior on the
linear-Gaussian model, whose sandwich is still 0.6 nats wide there (no power, much cost).
``test_online_adaptation_is_caught`` checks the suite's power on the known-biased
``adapt="online"`` mode; ``benchmarks/validity_table.py`` prints the comparison over
3 seeds.

Seeds are fixed, so a run is reproducible. At 3 se a valid side fails by chance with
probability about 0.13%; only the tight cases (large T, the fitted encoder) sit near 0,
a loose bound's violation is many se negative.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import pyro
import pytest
import torch

from models import EXACT_MODELS
from pyro_mi.bounds import METHODS, bound_class
from pyro_mi.density import ModelDensity
from pyro_mi.proposal import GaussianEncoder, PriorProposal, fit_guide

pytestmark = pytest.mark.slow

#: simulated points per model (the paired se shrinks as 1/sqrt(N); on these small models
#: AIS cost is mostly per-step overhead, so N is not the main cost)
NUM_DATA = {name: 1000 for name in EXACT_MODELS}
#: seed of the simulated points; the encoder fit and each bound get their own seeds
DATA_SEED = 20240
#: BA fitting steps of the GaussianEncoder proposal
FIT_STEPS = 200
#: number of standard errors a mean paired violation may reach
Z_MAX = 3.0

AIS_METHODS = ("ais", "im-ais", "cr-ais", "bdmc")


# ---------------------------------------------------------------- set-up (cached per session)
@functools.lru_cache(maxsize=None)
def simulated(model_name: str, proposal: str):
    """(density, proposal object, x, z, m) for a model: the N simulated points and their exact MI.

    ``m`` (N,) float64 is log p(x_i | z_i) - log p(x_i) with the exact marginal. ``proposal``
    is ``"prior"`` (:class:`PriorProposal`) or ``"encoder"`` (a :class:`GaussianEncoder`
    fitted by :func:`fit_guide` for ``FIT_STEPS`` steps).
    """
    exact = EXACT_MODELS[model_name]()
    density = ModelDensity(exact.model, "x")
    pyro.set_rng_seed(DATA_SEED)
    x, z = density.sample(NUM_DATA[model_name])
    with torch.no_grad():
        m = density.log_likelihood(x, z).double() - exact.log_px(x["x"])
    if proposal == "prior":
        q = PriorProposal(density)
    elif proposal == "encoder":
        pyro.set_rng_seed(DATA_SEED + 1)
        q = GaussianEncoder(density)
        fit_guide(density, q, num_steps=FIT_STEPS, progress=False)
    else:  # pragma: no cover - a typo in the case table
        raise ValueError(proposal)
    return density, q, x, z, m


def _default_num_steps(method: str):
    """The default T of an AIS method, read from its declaration (None if it has none)."""
    f = bound_class(method).option_fields().get("num_steps")
    return None if f is None else f.default


class Run(NamedTuple):
    """What the tests keep of one bound's result (not its recorded chains, to keep memory flat).

    Attributes:
        lower, upper: per-point MI bounds (N,), nats.
        settings: the result's ``settings`` dict (T, K, adapt mode, ...).
        diagnostics: the per-point tensors ``log_weights_forward`` (K, N),
            ``log_p_x_lower`` and ``log_p_x_upper`` (N,) where the method reports them.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    settings: dict
    diagnostics: dict


@functools.lru_cache(maxsize=None)
def bound(model_name: str, proposal: str, method: str, options: tuple) -> Run:
    """Runs ``METHODS[method]`` on the cached simulated points with ``dict(options)``.

    Every run starts from its own fixed seed, so a case gives the same numbers alone or
    in the full suite. Cached, so that later tests (forward weights, the gap as T grows)
    reuse the runs of the validity cases.
    """
    density, q, x, z, _ = simulated(model_name, proposal)
    pyro.set_rng_seed(DATA_SEED + 2)
    r = METHODS[method](density, q, x, z, progress=False, **dict(options))
    keep = ("log_weights_forward", "log_p_x_lower", "log_p_x_upper")
    diagnostics = {k: r.diagnostics[k].detach() for k in keep if k in (r.diagnostics or {})}
    return Run(r.lower_per_point.detach(), r.upper_per_point.detach(), dict(r.settings or {}), diagnostics)


def paired_violation(diff: torch.Tensor) -> tuple[float, float, float]:
    """Mean, standard error and z-score (mean / se) of paired differences (N,), in nats."""
    diff = diff.double()
    mean = float(diff.mean())
    se = float(diff.std() / math.sqrt(diff.numel()))
    z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    return mean, se, z


def assert_paired_validity(label: str, lower: torch.Tensor, upper: torch.Tensor, m: torch.Tensor) -> None:
    """Asserts that the per-point MI bounds hold on average against the exact per-point MI.

    Lower side: violation mean(l_i - m_i); upper side: violation mean(m_i - u_i). Each
    must be at most ``Z_MAX`` standard errors of its paired differences, and every
    per-point value must be finite (a non-finite bound is an error, not a bound).

    Args:
        label: names the case in the failure message (method, model, proposal, T, K).
        lower, upper: per-point MI lower and upper bounds (N,), nats.
        m: exact per-point MI (N,), nats.

    Raises:
        AssertionError: listing every failing side with its violation, se and z-score.
    """
    problems = []
    for side, values, diff in (("lower", lower, lower.double() - m), ("upper", upper, m - upper.double())):
        if not bool(torch.isfinite(values).all()):
            bad = int((~torch.isfinite(values)).sum())
            problems.append(f"{label}: {side} bound is not finite at {bad} of {values.numel()} points")
            continue
        v, se, z = paired_violation(diff)
        if v > Z_MAX * se:
            wrong = "above" if side == "lower" else "below"
            problems.append(
                f"{label}: MI {side} bound lies {wrong} the exact per-point MI: mean violation "
                f"{v:+.5f} nats, se {se:.5f}, z = {z:+.2f} > {Z_MAX:g} (N = {diff.numel()})"
            )
    assert not problems, "\n".join(problems)


def assert_unbiased_weights(label: str, log_w: torch.Tensor, log_px: torch.Tensor) -> None:
    """Asserts E[w / p(x)] = 1 for forward AIS log weights ``log_w`` (K, N) and exact ``log_px`` (N,).

    Per point, r_i = (1/K) sum_k exp(log w_ki - log p(x_i)); the mean of r_i - 1 over the
    N points must lie within ``Z_MAX`` standard errors of 0 (both sides).

    Raises:
        AssertionError: naming the case, the mean of r - 1, its se and z-score.
    """
    assert log_w.dim() == 2 and log_w.shape[1] == log_px.numel(), tuple(log_w.shape)
    ratio = torch.exp(log_w.double() - log_px.double()).mean(0)
    v, se, z = paired_violation(ratio - 1)
    assert abs(v) <= Z_MAX * se, (
        f"{label}: E[w_fwd / p(x)] - 1 = {v:+.5f} ± {se:.5f}, z = {z:+.2f} (|z| > {Z_MAX:g}; "
        f"K = {log_w.shape[0]}, N = {log_w.shape[1]}): the forward weights are biased"
    )


# ---------------------------------------------------------------- the case table
def _steps(method: str, t: int) -> tuple:
    """Options for T = t: none at all when t is the method's default T (that call *is* the default, with
    the per-point fit of ``precondition="all"``); at other T the chains start from the proposal itself
    (``precondition="none"``), which tests the kernel and the estimators at every T without paying for
    a fit in each case."""
    return () if t == _default_num_steps(method) else (("num_steps", t), ("precondition", "none"))


def _ais_cases(model_name: str, proposal: str, steps: tuple[int, ...], methods=AIS_METHODS):
    """Cases for AIS ``methods``: each T in ``steps``, and the method's default call
    when its default T is not among them."""
    cases = []
    for method in methods:
        if _default_num_steps(method) not in steps:
            cases.append((model_name, proposal, method, ()))
        cases += [(model_name, proposal, method, _steps(method, t)) for t in steps]
    # the per-point fit is the same for every estimator: the default call of "ais" runs it on every model,
    # the other estimators' default calls start from the proposal itself (a fit per case cost minutes)
    return [(m, p, meth, opts if opts or meth == "ais" else (("precondition", "none"),))
            for m, p, meth, opts in cases]


def _importance_cases(model_name: str, proposal: str, large_k: int | None):
    """BA and IWAE at their defaults, IWAE at K = 10, and BA and IWAE at ``large_k`` where cheap."""
    cases = [
        (model_name, proposal, "ba", ()),
        (model_name, proposal, "iwae", ()),
        (model_name, proposal, "iwae", (("num_particles", 10),)),
    ]
    if large_k:
        cases += [(model_name, proposal, m, (("num_particles", large_k),)) for m in ("ba", "iwae")]
    return cases


#: (model, proposal) -> (AIS T values, large K of BA / IWAE or None)
PLAN = {
    ("linear-gaussian", "encoder"): ((10, 100, 1000), None),
    # with the prior as pi0 (MI 12.4 nats) the T = 1000 sandwich is still 0.6 nats wide: no power there
    ("linear-gaussian", "prior"): ((10, 100), None),
    ("two-sites", "prior"): ((10, 100, 1000), 10_000),
    ("beta-binomial", "prior"): ((10, 100, 1000), None),
    ("gamma-poisson", "prior"): ((10, 100, 1000), 10_000),
    # two models the step-size pilot was never tuned on: a simplex latent, a scale latent
    ("dirichlet-multinomial", "encoder"): ((10, 100), None),
    ("normal-gamma", "prior"): ((10, 100), None),
}
CASES = []
for (_model, _proposal), (_ts, _large_k) in PLAN.items():
    CASES += _importance_cases(_model, _proposal, _large_k) + _ais_cases(_model, _proposal, _ts)


def _case_id(case) -> str:
    """Test id: method, model, proposal and the options (``default``, with its T for AIS)."""
    model_name, proposal, method, options = case
    short = {"num_steps": "T", "num_particles": "K", "num_chains": "K"}
    opts = ",".join(f"{short.get(k, k)}={v}" for k, v in options)
    if not opts:
        default_t = _default_num_steps(method) if method in AIS_METHODS else None
        opts = "default" if default_t is None else f"default(T={default_t})"
    return f"{method}-{model_name}-{proposal}-{opts}"


def _label(case, result) -> str:
    """The failure-message name of a case, with the settings the method reports."""
    model_name, proposal, method, _ = case
    settings = result.settings
    shown = {k: settings[k] for k in ("num_steps", "num_chains", "num_particles", "adapt") if k in settings}
    desc = ", ".join(f"{'T' if k == 'num_steps' else k}={v}" for k, v in shown.items())
    return f"{method} on {model_name} ({proposal} proposal; {desc})"


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_paired_validity(case):
    """Both sides of every bound hold against the exact per-point MI of the same points."""
    model_name, proposal, method, options = case
    *_, m = simulated(model_name, proposal)
    r = bound(*case)
    assert r.lower.shape == m.shape and r.upper.shape == m.shape
    assert_paired_validity(_label(case, r), r.lower, r.upper, m)


@pytest.mark.parametrize("method", AIS_METHODS)
def test_log_p_x_bounds_match_mi_bounds(method):
    """The reported log p(x) bounds are the MI bounds' other face: lower MI = log p(x|z) - upper log p(x)."""
    density, _, x, z, m = simulated("linear-gaussian", "encoder")
    r = bound("linear-gaussian", "encoder", method, _steps(method, 10))
    log_lik = density.log_likelihood(x, z)
    torch.testing.assert_close(r.lower, log_lik - r.diagnostics["log_p_x_upper"])
    torch.testing.assert_close(r.upper, log_lik - r.diagnostics["log_p_x_lower"])


@pytest.mark.parametrize(
    "model_name,proposal,num_steps",
    [("linear-gaussian", "encoder", 100), ("linear-gaussian", "encoder", 1000), ("beta-binomial", "prior", 1000)],
)
def test_forward_weights_are_unbiased(model_name, proposal, num_steps):
    """E[w_fwd / p(x)] = 1: AIS forward weights are unbiased estimators of p(x) (Neal 2001).

    Reuses the ``ais`` validity runs. Not with the prior as pi0 on the linear-Gaussian
    model (MI 12.4 nats): there the weights at T <= 100 are so heavy-tailed that their
    sample mean and se say nothing (an exact run gave -0.9997 ± 0.0003 at T = 10).
    """
    case = (model_name, proposal, "ais", _steps("ais", num_steps))
    _, _, x, _, _ = simulated(model_name, proposal)
    r = bound(*case)
    log_px = EXACT_MODELS[model_name]().log_px(x["x"])
    assert_unbiased_weights(_label(case, r), r.diagnostics["log_weights_forward"], log_px)


def test_online_adaptation_is_caught():
    """The suite's power: the known bias of ``adapt="online"`` (an approximate, opt-in mode)
    is detected by both checks on Beta-Binomial at T = 1000.

    Measured here (N = 1000, K = 4): the MI lower bound lies 0.036 nats above the truth
    (z = +25) and E[w/p(x)] - 1 = -4.7% (z = -33); the exact default gives z = +0.2 and
    -0.6 on the same points. Should online adaptation ever become exact, this test has
    done its job and goes.
    """
    case = ("beta-binomial", "prior", "ais", _steps("ais", 1000) + (("adapt", "online"),))
    try:
        r = bound(*case)
    except ValueError as e:  # pragma: no cover - the mode was removed
        if "adapt" in str(e):
            pytest.skip(f"no online adaptation: {e}")
        raise
    _, _, x, _, m = simulated("beta-binomial", "prior")
    with pytest.raises(AssertionError, match="lies above the exact per-point MI"):
        assert_paired_validity(_label(case, r), r.lower, r.upper, m)
    log_px = EXACT_MODELS["beta-binomial"]().log_px(x["x"])
    with pytest.raises(AssertionError, match="forward weights are biased"):
        assert_unbiased_weights(_label(case, r), r.diagnostics["log_weights_forward"], log_px)


def test_gap_closes_as_num_steps_grows():
    """The AIS sandwich tightens with T on the same points (reuses the validity runs)."""
    gaps = []
    for t in (10, 100, 1000):  # all from the proposal itself (at T = 100 the default's fit closes the gap)
        r = bound("linear-gaussian", "encoder", "ais", (("num_steps", t), ("precondition", "none")))
        gaps.append(float((r.upper - r.lower).mean()))
    assert gaps[0] > gaps[1] > gaps[2] > -0.01, gaps
