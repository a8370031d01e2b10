"""Multi-sample AIS bounds on generative MI (Brekelmans et al. 2022, sec. 3, App. D–H).

With (x_i, z_i) ~ p(x, z) simulated from the model, I(x; z) = E[log p(x|z)] - E[log p(x)]
(eq. 1), so a lower bound (ELBO) on log p(x_i) gives an MI upper bound
log p(x_i|z_i) - ELBO_i and an upper bound (EUBO) an MI lower bound
log p(x_i|z_i) - EUBO_i. AIS chains (:mod:`pyro_mi.samplers.ais`) anneal from pi0 (the
prior p(z), or a proposal q(z|x)) to p(x, z) along eq. 11 with T steps; the simulated
z_i is the exact posterior sample that starts every reverse chain. From the log
weights of forward chains (fwd) and reverse chains (rev), the estimators below are
pure functions:

* **IM-AIS** (Independent Multi-Sample AIS, eq. 13–14, :func:`im_ais_log_px`):
  ELBO = log (1/K) sum_k w_k^fwd (K forward chains);
  EUBO = log (1/K) (w^rev + sum_{k<K} w_k^fwd) (one reverse chain from z_i and the
  first K-1 forward chains).
* **CR-AIS** (Coupled Reverse Multi-Sample AIS, eq. 15–17, App. H, :func:`cr_ais_log_px`):
  EUBO = -log (1/K) sum_k 1 / w_k^rev (K reverse chains, all from z_i);
  ELBO = -log (1/K) (1 / w^fwd + sum_{k<K} 1 / w_k^rev) (one forward chain, then K-1
  reverse chains from its final state).
* **BDMC** (sec. 3.4, :func:`bdmc_log_px`): the IM-AIS ELBO with the CR-AIS EUBO.

With T = 1 the IM-AIS bounds equal the IWAE bounds (eq. 5) on the same draws; with
K = 1 every pair is single-chain AIS (App. D).

**Exact by default.** The bounds hold only if every transition kernel is fixed before
the chains whose weights enter them start (a kernel that adapts along its own chain
biases the weights). ``adapt="pilot"`` (default) tunes step sizes in a cheap pilot
(:func:`pyro_mi.samplers.pilot_step_sizes`: ``pilot_chains`` forward chains on a
coarse sub-grid of the schedule), freezes them per annealing step and data point, and
then runs every bound-bearing chain with those fixed kernels and fresh random numbers.
``adapt="none"`` uses ``step_size`` everywhere (exact too). ``adapt="online"`` adapts
each forward chain's step size as it anneals (the paper's code, App. O.1.2); its
bounds are approximate and the result says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pyro
import torch

from ..checkpoint import Checkpoint, check_output_path, finishing, fingerprint
from ..density import Data, ModelDensity
from ..distributed import POINTS_PER_BLOCK, block_seed, map_blocks, seeded_global_rng
from ..proposal import GuideDensity, PriorProposal, log_prob_given, proposal_for_points, proposal_from_point
from ..recording import ChainRecorder, ChainSummary, ProgressBar
from ..result import MIResult, finite_side, require_finite
from ..runtime import RUNTIME_FIELDS, ChainRunner, Runtime, cli
from ..samplers import OnlineAdapter, get_schedule, pilot_step_sizes
from ..samplers.compile import compile_components, resolve_mode
from ..weights import importance_ess, log_mean_exp
from .declaration import Bound, check_positive_int
from .preconditioner import precondition

ADAPT_MODES = ("pilot", "online", "none")
#: default chunk size: at most this many (chain, data point, dim) elements per chunk
CHUNK_ELEMENTS = 1 << 24
#: with recording on, each forward chain's draws at beta = 1 after the annealing (diagnostics only:
#: they cost as many transitions as T = 100 and leave the bounds as they are). With fewer, r-hat
#: measures how far the annealing's end points are from mixing rather than whether the chains
#: agree (linear-vae, L = 2: median r-hat 1.08, max 1.54 with 20; 1.02 and 1.14 with 100).
POSTERIOR_DRAWS = 100
#: the default fraction of points that ``refine`` may rerun (see :func:`refined_points`); only points whose
#: pilot ended more than REFINE_MIN_GAP nats from their target are, so a model whose points all reach it pays
#: nothing (chosen on the model zoo against 0.05: ``benchmarks/model_zoo.py``)
REFINE = 0.3
#: ``precondition``: per-point Gaussian fits (:mod:`~pyro_mi.bounds.preconditioner`) for every point, for
#: the refined points only, or none
PRECONDITION_MODES = ("all", "refine", "none")
PRECONDITION = "all"
#: the fit's Adam steps per re-whitened round, its rounds for every point, and for a point whose fit still moves
PRECONDITION_STEPS = 150
PRECONDITION_ROUNDS = 3
PRECONDITION_MAX_ROUNDS = 12
#: a warning is attached below this mean importance ESS of the forward weights
ESS_WARNING = 1.5


def components_fn(density: ModelDensity, proposal, x: Data) -> Callable:
    """``z (C, N, D) -> (log pi0(z), log p(x, z))``, each (C, N), for the AIS path.

    pi0 is the proposal at the fixed x (:func:`~pyro_mi.proposal.log_prob_given`: the prior reads
    log p(z) from the model trace that gives log p(x, z); a
    :class:`~pyro_mi.proposal.GaussianEncoder` runs its network once here, since x is fixed along
    the path). Pyro's argument validation is switched off inside, so that a chain stepping into a
    region of zero density gets -inf (and is rejected) instead of raising.
    """
    x = density.check_data(x)
    log_q = log_prob_given(proposal, x)

    def components(z):
        with pyro.validation_enabled(False):
            lp, ll = density.log_terms(x, z)
            return log_q(z, lp), lp + ll

    return components


# --------------------------------------------------------------------- estimators
def im_ais_log_px(forward: torch.Tensor, reverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """IM-AIS bounds on log p(x) (eq. 14) from log weights: forward (K, N), reverse (>= 1, N).

    Returns ``(elbo, eubo)``, each (N,), nats: ELBO = log mean_k w_k^fwd and
    EUBO = log (1/K)(w_1^rev + sum_{k<K} w_k^fwd).
    """
    K = forward.shape[0]
    return log_mean_exp(forward, 0), log_mean_exp(torch.cat([reverse[:1], forward[: K - 1]], 0), 0)


def cr_ais_log_px(
    forward: torch.Tensor, reverse: torch.Tensor, reverse_from_forward: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """CR-AIS bounds on log p(x) (eq. 16–17): forward (>= 1, N), reverse (K, N) from the posterior
    sample, reverse_from_forward (K - 1, N) from the first forward chain's final state.

    Returns ``(elbo, eubo)``, each (N,), nats: EUBO = -log mean_k 1/w_k^rev and
    ELBO = -log (1/K)(1/w_1^fwd + sum_k 1/w_k^rev-from-fwd).
    """
    return -log_mean_exp(-torch.cat([forward[:1], reverse_from_forward], 0), 0), -log_mean_exp(-reverse, 0)


def bdmc_log_px(forward: torch.Tensor, reverse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BDMC bounds on log p(x) (sec. 3.4): the IM-AIS ELBO of forward (K, N) and the CR-AIS
    EUBO of reverse (K, N). Returns ``(elbo, eubo)``, each (N,), nats."""
    return log_mean_exp(forward, 0), -log_mean_exp(-reverse, 0)


# --------------------------------------------------------------------- runner
def run_chains(
    components: Callable,
    draw_pi0: Callable[[int], torch.Tensor],
    z: torch.Tensor,
    betas: torch.Tensor,
    ais: "AIS",
    *,
    num_forward: int,
    num_reverse: int,
    num_reverse_from_forward: int = 0,
    seed: int = 0,
    max_chains_per_chunk: int,
    checkpoint: Checkpoint | None = None,
    checkpoint_every: float = 60.0,
    observers: tuple = (),
    block: int = 0,
    posterior_draws: int = 0,
) -> dict:
    """Runs the AIS chains of a multi-sample bound and returns their log weights.

    Forward chains start at draws of pi0 (``draw_pi0(n) -> (n, N, D)``), reverse chains
    at the simulated z (N, D) (the posterior sample); ``num_reverse_from_forward``
    further reverse chains start at the final state of the first forward chain (CR-AIS
    ELBO, eq. 16). ``ais`` gives L, the step size and its adaptation (``adapt``, see the module
    docstring; its K, T and schedule are the caller's, in the counts and ``betas``). The chains
    run on a :class:`~pyro_mi.runtime.ChainRunner` (chunks of at most ``max_chains_per_chunk``,
    random numbers from ``seed``, ``observers``, the ``checkpoint`` part it saves to and resumes
    from), which also keeps the frozen step sizes.

    Returns:
        dict with ``forward`` (num_forward, N), ``reverse`` (num_reverse, N) and
        ``reverse_from_forward`` (num_reverse_from_forward, N) log weights (nats),
        ``step_sizes`` (T + 1, N) (the frozen table; for ``online`` the one the reverse
        chains used), ``keys`` (the chunks of the bound-bearing chains) and ``posterior``
        (``{key: draws}`` of the chunks with forward chains, with ``posterior_draws``).
    """
    N = z.shape[0]
    T = betas.numel() - 1
    runner = ChainRunner(components, draw_pi0, z, betas, ais.num_leapfrog, seed=seed,
                         max_chains_per_chunk=max_chains_per_chunk, checkpoint=checkpoint,
                         checkpoint_every=checkpoint_every, observers=observers, block=block,
                         posterior_draws=posterior_draws)
    payload = runner.payload
    with runner:
        table = payload.get("step_sizes")
        if ais.adapt == "pilot" and table is None:
            table, payload["pilot_gap"] = _pilot(runner, ais)
        elif ais.adapt == "none":
            table = z.new_full((T + 1, N), float(ais.step_size))
        payload["step_sizes"] = table
        if ais.adapt == "online":
            online = payload.setdefault("mean_log_step_size", OnlineAdapter())
            main = runner.job("main", [("fwd", None, num_forward)], online.init(ais.step_size), online.rule,
                              extra=(online,))
            table = payload["step_sizes"] = online.final(T + 1, num_forward) if T > 1 else z.new_full(
                (T + 1, N), float(ais.step_size))
            main += runner.job("rev", [("rev", z, num_reverse)], table)
        else:
            main = runner.job("main", [("fwd", None, num_forward), ("rev", z, num_reverse)], table)
        cr = []
        if num_reverse_from_forward > 0:
            start = next(o["first_forward"] for o in main if o["first_forward"] is not None)
            cr = runner.job("cr", [("rev", start, num_reverse_from_forward)], table)

    def split(outs):
        lw = torch.cat([o["log_weights"] for o in outs], 0)
        rv = torch.cat([o["reverse"] for o in outs], 0)
        return lw[~rv], lw[rv]

    fwd, rev = split(main)
    rev2 = split(cr)[1] if cr else z.new_zeros(0, N)
    keys = [k for k in payload["completed"] if k[0] in ("main", "rev", "cr") and k[-1] == block]
    return {"forward": fwd, "reverse": rev, "reverse_from_forward": rev2, "step_sizes": table, "keys": keys,
            "reverse_flags": {k: payload["completed"][k]["reverse"] for k in keys},
            "pilot_gap": payload.get("pilot_gap"),
            "posterior": {k: payload["completed"][k]["posterior"] for k in keys if "posterior" in payload["completed"][k]}}


def _pilot(runner: ChainRunner, ais: "AIS") -> tuple[torch.Tensor, torch.Tensor]:
    """The pilot of ``adapt="pilot"`` (:func:`~pyro_mi.samplers.pilot_step_sizes`) on the runner's
    points: the frozen step sizes (T + 1, N) and how far the pilot ended from each point's target,
    the Jensen gap of its log weights (N,) (inf where they are not finite)."""
    gen = runner.generator("pilot")
    z_p = runner.draw(ais.num_pilot_chains, "pilot")
    bars = [o for o in runner.observers if isinstance(o, ProgressBar)]  # the pilot is shown, not recorded

    def pilot_step(st, info):
        for bar in bars:
            bar(("pilot", 0, runner.block), st, info)

    table, weights = pilot_step_sizes(runner.components, z_p, runner.betas, ais.step_size, ais.num_leapfrog, gen,
                                      num_pilot_steps=ais.pilot_steps, on_step=pilot_step, return_weights=True)
    gap = log_mean_exp(weights, 0) - weights.mean(0)
    return table, torch.nan_to_num(gap, nan=math.inf)


# --------------------------------------------------------------------- bounds
#: method -> (chain plan for K chains, estimator)
_PLANS = {
    "im": (lambda K: dict(num_forward=K, num_reverse=1), lambda r: im_ais_log_px(r["forward"], r["reverse"])),
    "cr": (
        lambda K: dict(num_forward=1, num_reverse=K, num_reverse_from_forward=K - 1),
        lambda r: cr_ais_log_px(r["forward"], r["reverse"], r["reverse_from_forward"]),
    ),
    "bdmc": (lambda K: dict(num_forward=K, num_reverse=K), lambda r: bdmc_log_px(r["forward"], r["reverse"])),
}


def proposal_identity(proposal):
    """What identifies a proposal in a checkpoint's fingerprint: its parameters and code."""
    if isinstance(proposal, PriorProposal):
        return "prior"
    if isinstance(proposal, GuideDensity):
        return ("guide", proposal.guide, list(proposal.parameters()))
    return (type(proposal).__qualname__, proposal)


def _chains(constrained: Callable, recorder: ChainRecorder, keys: list, reverse_of: dict, betas,
            posterior: dict) -> dict:
    """The recorded chains of the bound-bearing chunks, for :mod:`pyro_mi.diagnostics`: a block's
    chunks side by side on the chain axis, the blocks on the data axis; and the forward chains'
    draws at beta = 1 after the annealing (``posterior``: ``{key: draws}``, see
    :func:`~pyro_mi.runtime.posterior_draws`), joined the same way."""
    keys = [k for k in keys if k in recorder.data]
    blocks = sorted({k[-1] for k in keys})
    recs = [[recorder.data[k] for k in keys if k[-1] == b] for b in blocks]

    def join(get, data_dim, parts=recs):
        return torch.cat([torch.cat([get(r) for r in block], 1) for block in parts], data_dim)

    reverse = torch.cat([reverse_of[k] for k in keys if k[-1] == blocks[0]])
    out = {
        "stats": {name: join(lambda r, n=name: r["stats"][n], 2) for name in recs[0][0]["stats"]},
        "direction": ["reverse" if r else "forward" for r in reverse.tolist()],
        "states": constrained(join(lambda r: r["states"], 2)),
        "record_steps": recorder.steps,
        "betas": betas,
    }
    draws = [[posterior[k] for k in keys if k[-1] == b and k in posterior] for b in blocks]
    if all(draws):
        out["posterior"] = {name: join(lambda d, n=name: d[n], 2, draws) for name in draws[0][0]}
        out["posterior"]["packed"] = out["posterior"].pop("z")
        out["posterior"]["z"] = constrained(out["posterior"]["packed"])
    return out


def anneal_log_normalizer(
    path_of: Callable[[int, int], tuple[Callable, Callable]],
    z: torch.Tensor,
    ais: "AIS",
    runtime: Runtime,
    *,
    seed: int,
    checkpoint,
    constrained: Callable,
    gather: bool = True,
) -> dict:
    """Multi-sample AIS bounds on log Z(x) = log ∫ gamma(z) dz for every data point.

    The shared engine of the AIS front ends: it runs the chains of ``ais`` (its estimator's,
    see :data:`_PLANS`) from pi0 to gamma, and
    checks and summarises them. The N points run in blocks of ``points_per_block``
    (:mod:`pyro_mi.distributed`: under ``torch.distributed`` each rank runs its blocks and
    every rank gets all of them; a block's random numbers come from (``seed``, block), so
    the numbers do not depend on the number of processes). ``path_of(lo, hi)`` gives the
    path of the points lo..hi-1: ``(components, draw_pi0)`` with ``components(z) ->
    (log pi0, log gamma)`` and forward chains from ``draw_pi0(n)``; reverse chains start at
    z (N, D). ``runtime`` is used as it is (its ``max_chains_per_chunk`` and
    ``points_per_block`` resolved, ``record`` meaning what is kept; the caller writes
    ``save_chains``); ``checkpoint`` is a :class:`~pyro_mi.checkpoint.Checkpoint` (or a part of
    one) that holds a part per block (the caller finishes it); ``constrained`` maps packed z to
    constrained sites (for the chain record); ``gather=False`` runs every block in this process.

    Returns:
        dict with ``lower`` and ``upper`` (N,) bounds on log Z(x) (nats; the upper one
        holds if z are exact samples of the normalised gamma), ``betas``,
        ``diagnostics`` (ESS, log weights, step sizes, chain statistics, and
        ``chains`` when ``record``), ``warnings`` (the approximate online mode; those of the
        points — divergent and stuck chains, a low ESS — are :func:`chain_warnings`, a check of the
        caller's result) and ``notes`` (a trace that fell back to eager).
    """
    N, D = z.shape
    num_steps, chunk, block_size = ais.num_steps, runtime.max_chains_per_chunk, runtime.points_per_block
    betas = get_schedule(ais.schedule, num_steps)
    plan, estimator = _PLANS[ais.estimator]
    summary = ChainSummary()
    recorder = ChainRecorder(num_steps) if runtime.record else None
    jobs = plan(ais.num_chains)
    chains = ([jobs["num_forward"], jobs["num_reverse"]] if ais.adapt == "online"
              else [jobs["num_forward"] + jobs["num_reverse"]]) + [jobs.get("num_reverse_from_forward", 0)]
    steps = sum(-(-c // chunk) for c in chains if c) * (betas.numel() - 1)
    bar = ProgressBar(steps * len(range(0, N, block_size)), runtime.progress)
    observers = tuple(o for o in (summary, recorder, bar, runtime.callback) if o is not None)
    kept = [o for o in (summary, recorder) if o is not None]  # observers whose records are gathered
    mode = resolve_mode(runtime.compile, num_steps, ais.num_leapfrog)

    def run_block(b: int, lo: int, hi: int) -> dict:
        components, draw_pi0 = path_of(lo, hi)
        components = compile_components(components, mode, num_steps)
        with pyro.validation_enabled(False):
            run = run_chains(
                components, draw_pi0, z[lo:hi], betas, ais, **jobs, seed=block_seed(seed, "block", b),
                max_chains_per_chunk=chunk,
                checkpoint=checkpoint.section(f"block:{b}") if checkpoint is not None else None,
                checkpoint_every=runtime.checkpoint_every, observers=observers, block=b,
                posterior_draws=POSTERIOR_DRAWS if runtime.record else 0,
            )
        run["records"] = [{k: v for k, v in o.data.items() if k[-1] == b} for o in kept]
        run["notes"] = list(getattr(components, "notices", []))
        return run

    try:
        blocks = map_blocks(run_block, N, block_size, device=z.device, gather=gather)
    finally:
        bar.close()
    for block in blocks:  # the records of other ranks' blocks
        for o, records in zip(kept, block["records"]):
            o.data.update(records)
    run = {name: torch.cat([blk[name] for blk in blocks], 1)
           for name in ("forward", "reverse", "reverse_from_forward", "step_sizes")}
    if all(blk.get("pilot_gap") is not None for blk in blocks):
        run["pilot_gap"] = torch.cat([blk["pilot_gap"] for blk in blocks])
    run["keys"] = [k for blk in blocks for k in blk["keys"]]
    run["reverse_flags"] = {k: v for blk in blocks for k, v in blk["reverse_flags"].items()}
    run["posterior"] = {k: v for blk in blocks for k, v in blk.get("posterior", {}).items()}
    lower, upper = estimator(run)
    fwd = run["forward"]
    ess = importance_ess(fwd)
    chain_stats = summary.totals(run["keys"])
    diagnostics = {
        "ess": float(ess.mean()),
        "ess_per_point": ess,
        "log_weights_forward": fwd,
        "log_weights_reverse": torch.cat([run["reverse"], run["reverse_from_forward"]], 0),
        "step_sizes": run["step_sizes"],
        **chain_stats,
    }
    if "pilot_gap" in run:
        diagnostics["pilot_gap"] = run["pilot_gap"]
    warnings = []  # those of the points are derived by chain_warnings, a check of the result
    if ais.adapt == "online":
        warnings.append("adapt='online' adapts step sizes along each chain's own path, which biases the AIS "
                        "weights: these bounds are approximate, not guaranteed (adapt='pilot' is exact)")
    if recorder is not None:
        diagnostics["chains"] = _chains(constrained, recorder, run["keys"], run["reverse_flags"], betas,
                                        run["posterior"])
    notes = list(dict.fromkeys(n for blk in blocks for n in blk["notes"]))
    return {"lower": lower, "upper": upper, "betas": betas, "diagnostics": diagnostics, "warnings": warnings,
            "notes": notes}


def chain_warnings(result: MIResult) -> list[str]:
    """The warnings an AIS result derives from its points (one of its
    :attr:`~pyro_mi.result.MIResult.checks`): chains that diverged or never moved (counted per point in
    ``diagnostics``), and a low mean importance ESS of the forward chains' weights."""
    d = result.diagnostics
    fwd = d["log_weights_forward"]
    N, total, T = fwd.shape[-1], fwd.shape[0] + d["log_weights_reverse"].shape[0], d["step_sizes"].shape[0] - 1
    warnings = []
    for name, what, advice in (
            ("divergent_chains", "diverged (over 10% of their HMC transitions rejected as divergent)",
             "a smaller step_size (adapt='none'), more num_steps, or a proposal closer to the posterior"),
            ("stuck_chains", "never accepted a move, so their weights come from where they started",
             "more num_steps (smaller steps between betas), or a proposal closer to the posterior")):
        count = d.get(name)
        if count is None or not int(count.sum()):
            continue
        points = count.nonzero().flatten()
        listed = ", ".join(str(int(i)) for i in points[:5])
        warnings.append(
            f"{int(count.sum())} of {total * N} chains ({int(count.sum()) / (total * N):.2%}) {what}, at "
            f"{points.numel()} points (first: {listed}): the bounds stay valid but may be loose there; try {advice}")
    ess = d["ess_per_point"]
    if T > 1 and fwd.shape[0] > 1 and float(ess.mean()) < ESS_WARNING:
        warnings.append(
            f"the importance ESS of the forward chains' weights is {float(ess.mean()):.2f} on average (below "
            f"{ESS_WARNING}): one chain dominates each AIS estimate, so the bounds may be loose; "
            "try more num_steps or num_chains")
    return warnings


def _bounds(ais: "AIS", density: ModelDensity, proposal, x: Data, z: torch.Tensor, runtime: Runtime) -> MIResult:
    """The run of :class:`AIS` (see :meth:`AIS.run`)."""
    method = ais.name
    run = resolved(runtime, density, z)
    x = density.check_data(x)
    seed = int(torch.randint(2**62, (1,), generator=runtime.generator))
    settings = ais.settings(runtime.compile)
    settings["refine"] = ais.refine
    ckpt = None
    if runtime.checkpoint is not None:
        fp = fingerprint(method, settings, seed, get_schedule(ais.schedule, ais.num_steps), x, z,
                         proposal_identity(proposal), density.model, density.model_args, density.model_kwargs,
                         run.record, run.points_per_block)
        ckpt = Checkpoint(runtime.checkpoint, fp)
    with torch.no_grad(), pyro.validation_enabled(False):
        log_lik = density.log_terms(x, z)[1]

    def paths(d, q0, xs):
        def path_of(lo, hi):
            xb, q = {k: v[lo:hi] for k, v in xs.items()}, proposal_from_point(q0, lo)
            return components_fn(d.from_point(lo), q, xb), lambda n: q.rsample(xb, n)[0].detach()

        return path_of

    chosen, alternatives = [], []  # the points whose fit chose the alternative parameterisation, and it

    def whitened(d, q, xs, zs, index=None):
        """The path's density, proposal and simulated z in the whitened coordinates of a per-point
        Gaussian fit (:func:`~pyro_mi.bounds.preconditioner.precondition`), its random numbers its own."""
        with seeded_global_rng(block_seed(seed, "precondition"), zs.device):
            wd, wq, wz, other, alt = precondition(d, q, xs, zs, rounds=PRECONDITION_ROUNDS, steps=PRECONDITION_STEPS,
                                                  max_rounds=PRECONDITION_MAX_ROUNDS, progress=run.progress)
        chosen.extend((other if index is None else index[other]).tolist())
        alternatives.append(alt)
        return wd, wq, wz

    with finishing(ckpt):
        d_run, q_run, z_run = density, proposal, z
        if ais.precondition == "all":
            d_run, q_run, z_run = whitened(density, proposal, x, z)
        out = anneal_log_normalizer(paths(d_run, q_run, x), z_run, ais, run, seed=seed, checkpoint=ckpt,
                                    constrained=d_run.constrained)
        index = refined_points(out["diagnostics"].get("pilot_gap"), ais.refine)
        if index is not None:  # the points the pilot found far from their target: rerun with REFINE_FACTOR x T
            num_steps = ais.num_steps * REFINE_FACTOR
            d_sub, q_sub, x_sub = density.for_points(index), proposal_for_points(proposal, index), \
                {k: v[index] for k, v in x.items()}
            z_sub = z[index]
            if ais.precondition == "all":
                d_sub, q_sub, z_sub = d_run.for_points(index), q_run.for_points(index), z_run[index]
            elif ais.precondition == "refine":
                d_sub, q_sub, z_sub = whitened(d_sub, q_sub, x_sub, z_sub, index=index)
            sub = anneal_log_normalizer(
                paths(d_sub, q_sub, x_sub), z_sub, ais.replace(num_steps=num_steps, pilot_steps=None),
                run.replace(record=False), seed=block_seed(seed, "refine"),
                checkpoint=ckpt.section("refine") if ckpt is not None else None, constrained=d_sub.constrained)
            _replace_points(out, sub, index)
            settings["refined_points"] = int(index.numel())
            out["notes"].append(
                f"{index.numel()} of {z.shape[0]} points, those whose pilot ended farthest from their target (a Jensen "
                f"gap of its log weights above {REFINE_MIN_GAP:g} nats), were rerun with T = {num_steps} "
                "annealing steps and their first run dropped (the choice depends on x and the pilot only, so every "
                "bound holds); indices in diagnostics['refined_points']")
            out["diagnostics"]["refined_points"] = index.tolist()
            if run.record:
                out["notes"].append("the recorded chains of the refined points are those of their first run (dropped "
                                    "from the bounds); their per-point values are the rerun's")
        if chosen:
            alt = next(a for a in alternatives if a is not None)
            out["diagnostics"][alt.key] = chosen
            out["notes"].append(
                f"{len(chosen)} of {z.shape[0]} points ran {alt.described}: the former where its Gaussian fit had "
                f"the higher ELBO and was near exact (a choice from x alone, so every bound holds); indices in "
                f"diagnostics[{alt.key!r}]")
    elbo, eubo = out["lower"], out["upper"]
    require_finite(method, {"log p(x|z) of the simulated points": log_lik})
    advice = "use a proposal closer to the posterior, or more num_steps"
    lower, no_lower = finite_side(method, "lower", log_lik - eubo, "a reverse chain's weight is infinite", advice)
    upper, no_upper = finite_side(method, "upper", log_lik - elbo, "every forward chain has zero weight", advice)
    diagnostics = {"log_p_x_lower": elbo, "log_p_x_upper": eubo, **out["diagnostics"]}
    draws = diagnostics.get("chains", {}).get("posterior")
    if draws is not None:  # log p(x_i|z) at each posterior draw, for ArviZ's log_likelihood group
        packed = draws.pop("packed")  # in the run's coordinates
        with torch.no_grad(), pyro.validation_enabled(False):
            draws["log_likelihood"] = d_run.log_terms(x, packed)[1]
    result = MIResult(method, lower_per_point=lower, upper_per_point=upper, settings=settings, diagnostics=diagnostics,
                      warnings=out["warnings"] + no_lower + no_upper, notes=out["notes"], x=x, z=z,
                      checks=(chain_warnings,))
    if runtime.save_chains is not None:
        from ..diagnostics import write_chains

        write_chains(result, runtime.save_chains)
    return result


#: a point is rerun (``refine``) when its pilot's log weights have a Jensen gap above this (nats; 10 before
#: ``precondition``, whose pilots end nearer their targets: see the docs' tuning page) ...
REFINE_MIN_GAP = 2.0
#: ... with this many times the annealing steps
REFINE_FACTOR = 10


def refined_points(pilot_gap: torch.Tensor | None, fraction: float) -> torch.Tensor | None:
    """The points to rerun: of those whose pilot gap exceeds :data:`REFINE_MIN_GAP`, the
    ``fraction`` of all points with the largest (in point order); None if none (or no pilot)."""
    if pilot_gap is None or not fraction:
        return None
    k = int(fraction * pilot_gap.numel())
    order = pilot_gap.argsort(descending=True)[:k]
    index = order[pilot_gap[order] > REFINE_MIN_GAP].sort().values
    return index if index.numel() else None


def _replace_points(out: dict, sub: dict, index: torch.Tensor) -> None:
    """Puts a rerun's per-point bounds and diagnostics (of the points ``index``) in place of the first run's
    (but the step sizes, of another schedule, and the first pilot's gap, which chose the points)."""
    for side in ("lower", "upper"):
        out[side] = out[side].clone()
        out[side][index] = sub[side]
    d, s = out["diagnostics"], sub["diagnostics"]
    for key, v in s.items():
        if isinstance(v, torch.Tensor) and key in d and isinstance(d[key], torch.Tensor) \
                and key not in ("step_sizes", "pilot_gap") \
                and v.dim() and d[key].dim() == v.dim() and d[key].shape[-1] == out["lower"].numel() \
                and v.shape[:-1] == d[key].shape[:-1]:
            d[key] = d[key].clone()
            d[key][..., index] = v
    d["ess"] = float(d["ess_per_point"].mean())


def resolved(runtime: Runtime, density: ModelDensity, z: torch.Tensor) -> Runtime:
    """The runtime an AIS run uses: ``save_chains`` checked for writability (and implying ``record``),
    ``points_per_block`` defaulted to :data:`POINTS_PER_BLOCK` and ``max_chains_per_chunk`` to as many
    chains as keep a chunk under :data:`CHUNK_ELEMENTS` (chain, point, dim) elements."""
    if runtime.save_chains is not None:
        check_output_path(runtime.save_chains, "save_chains")
    block = runtime.points_per_block or POINTS_PER_BLOCK
    dim = max(density.latent_dim, density.obs_dim)
    return runtime.replace(
        record=runtime.record or runtime.save_chains is not None, points_per_block=block,
        max_chains_per_chunk=runtime.max_chains_per_chunk or max(1, CHUNK_ELEMENTS // (min(z.shape[0], block) * dim)))


#: the estimators of :class:`AIS` and their method names (``"im-ais"`` is a second name of ``"ais"``)
ESTIMATORS = {"im": "ais", "cr": "cr-ais", "bdmc": "bdmc"}


@dataclass(frozen=True)
class AIS(Bound):
    """Multi-sample AIS bounds on I(x; z) (Brekelmans et al. 2022, sec. 3, eq. 13–17, App. D–H).

    Chains anneal from pi0 (the proposal) to p(x, z) along eq. 11 with T steps of HMC; the
    simulated z_i starts every reverse chain. ``estimator`` picks the bound pair:

    * ``"im"`` (method ``"ais"``, the recommended sandwich; IM-AIS, eq. 13–14, App. E): MI upper =
      log p(x|z) - log (1/K) sum_k w_k (K forward chains, the paper's recommendation), MI lower =
      log p(x|z) - log (1/K) (w_rev + sum_{k<K} w_k) (one reverse chain from the simulated z plus
      K-1 forward chains). T = 1 gives IWAE (with pi0 as the proposal), K = 1 single-chain AIS. Cost:
      K + 1 chains.
    * ``"cr"`` (``"cr-ais"``; CR-AIS, eq. 15–17, App. H): MI lower = log p(x|z) + log (1/K) sum_k
      1/w_k^rev (K reverse chains from the simulated z); MI upper = log p(x|z) + log (1/K)
      (1/w^fwd + sum_{k<K} 1/w_k^rev) (one forward chain, then K-1 reverse chains from its final
      state). Cost: 2K chains, two sequential phases.
    * ``"bdmc"`` (Grosse et al. 2015; sec. 3.4): MI upper from the IM-AIS ELBO (K forward chains),
      MI lower from the CR-AIS EUBO (K reverse chains). Cost: 2K chains.

    Attributes:
        num_chains: K, AIS chains per data point (per direction).
        num_steps: T, annealing steps (T - 1 HMC transitions per chain; T = 1 is IWAE).
        num_leapfrog: L, leapfrog steps per HMC transition (one model evaluation each).
        step_size: the HMC step size with ``adapt="none"``; where the pilot's search starts with
            ``"pilot"``; the initial one with ``"online"``.
        schedule: ``"sigmoid"`` (Wu et al. 2017, radius 4), ``"linear"``, or betas (T + 1,).
        adapt: ``"pilot"`` (exact: step sizes tuned in a pilot, then frozen), ``"none"`` (exact:
            ``step_size`` throughout) or ``"online"`` (approximate; labelled so).
        pilot_chains, pilot_steps: the pilot's forward chains per data point (default 8) and
            annealing steps (default ceil(T / 5), at least 5); only with ``"pilot"``.
        refine: with ``adapt="pilot"``, at most this fraction of the points, those whose pilot
            ended farthest from their target (the Jensen gap of its log weights, above
            :data:`REFINE_MIN_GAP` nats), are rerun with :data:`REFINE_FACTOR` times the steps, their
            first run dropped: the few points of a heavy-tailed prior that carry most of a gap get
            the steps they need. The choice depends on x and the pilot only, so the bounds hold.
            0: none; not with ``record`` or ``save_chains``.
        estimator: ``"im"``, ``"cr"`` or ``"bdmc"`` (above).
        precondition: ``"all"`` (default): before any chain runs, a full-rank Gaussian is fitted to
            each point's posterior, from its mode and Laplace covariance by the ELBO
            (:func:`~pyro_mi.bounds.preconditioner.fit_point_gaussians`; :data:`PRECONDITION_ROUNDS` rounds of :data:`PRECONDITION_STEPS` steps, up to
            :data:`PRECONDITION_MAX_ROUNDS` for a fit still moving), and the chains run in its whitened
            coordinates (HMC with a per-point mass matrix) from pi0 = 0.9 N(fit) + 0.1 q, a defensive
            mixture with the proposal q; ``"refine"``: only for the points ``refine`` reruns; ``"none"``:
            pi0 = q and HMC in the packed coordinates. The fit depends on x and its own random numbers
            only, so the bounds hold whatever it reaches (:mod:`~pyro_mi.bounds.preconditioner`).

    Runtime: every :class:`~pyro_mi.runtime.Runtime` setting (``points_per_block`` default
    :data:`~pyro_mi.distributed.POINTS_PER_BLOCK`).

    :meth:`run` returns an :class:`~pyro_mi.result.MIResult` (nats) whose ``diagnostics`` hold
    ``ess`` (mean importance ESS of the forward chains' final weights), ``accept_rate``,
    ``divergences``, ``divergent_chain_fraction``, ``step_sizes`` (T + 1, N), the log weights, the
    log p(x) bounds per point and, with ``record``, ``chains`` (for
    :meth:`~pyro_mi.result.MIResult.to_arviz`); ``warnings`` name divergent chains and chains that
    never moved (and the points they belong to), a low ESS (< 1.5) and the approximate online mode.

    Raises:
        ValueError: (when declared) non-positive K, T, L or step size, an unknown adapt mode or
            estimator, pilot options with another adapt mode, ``refine`` outside [0, 1]; (at
            :meth:`run`) an unwritable, foreign or busy checkpoint, an unwritable ``save_chains``,
            shape mismatches of x and z, a non-finite bound (naming its cause), an unknown schedule.
        DistributedError: under ``torch.distributed``, another rank died or timed out.
    """

    # K is small because the interval for the model's MI is set mostly by N, not by the gap (at equal
    # seconds, see the docs' "Choosing N, K and T")
    num_chains: int = field(default=4, metadata=cli("K, AIS chains per data point", type=int))
    num_steps: int = field(default=100, metadata=cli("T, annealing steps (T=1 is IWAE)", type=int))
    num_leapfrog: int = field(default=2, metadata=cli("L, leapfrog steps per HMC transition", type=int))
    step_size: float = field(default=0.05, metadata=cli("initial HMC step size", type=float))
    schedule: Any = field(default="sigmoid", metadata=cli("annealing schedule", choices=("linear", "sigmoid")))
    adapt: str = field(default="pilot", metadata=cli(
        "step-size adaptation: pilot (exact bounds), online (approximate) or none", choices=ADAPT_MODES))
    pilot_chains: int | None = None
    pilot_steps: int | None = None
    refine: float = field(default=REFINE, metadata=cli(
        "the most points (a fraction) whose pilot ended far from their target that are rerun with 10x the "
        "annealing steps", type=float))
    estimator: str = "im"
    precondition: str = field(default=PRECONDITION, metadata=cli(
        "per-point Gaussian fits that start and precondition the chains: all points, the refined ones, or none",
        choices=PRECONDITION_MODES))

    RUNTIME = frozenset(RUNTIME_FIELDS)

    def __post_init__(self):
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {self.estimator!r}")
        if self.precondition not in PRECONDITION_MODES:
            raise ValueError(f"precondition must be one of {PRECONDITION_MODES}, got {self.precondition!r}")
        if self.adapt not in ADAPT_MODES:
            raise ValueError(f"adapt must be one of {ADAPT_MODES}, got {self.adapt!r}")
        if self.adapt != "pilot" and (self.pilot_chains is not None or self.pilot_steps is not None):
            raise ValueError(f"pilot_chains and pilot_steps apply only to adapt='pilot', not adapt={self.adapt!r}")
        for name in ("num_chains", "num_steps", "num_leapfrog"):
            check_positive_int(name, getattr(self, name))
        check_positive_int("pilot_chains", self.pilot_chains, optional=True)
        check_positive_int("pilot_steps", self.pilot_steps, optional=True)
        if isinstance(self.step_size, bool) or not isinstance(self.step_size, (int, float)) \
                or not 0 < self.step_size < float("inf"):
            raise ValueError(f"step_size must be a positive number, got {self.step_size!r}")
        if isinstance(self.refine, bool) or not isinstance(self.refine, (int, float)) or not 0 <= self.refine <= 1:
            raise ValueError(f"refine must be a fraction of the points in [0, 1], got {self.refine!r}")

    @property
    def name(self) -> str:
        return ESTIMATORS[self.estimator]

    @property
    def num_pilot_chains(self) -> int:
        """The pilot's forward chains per data point (``pilot_chains``, default 8)."""
        return 8 if self.pilot_chains is None else self.pilot_chains

    def settings(self, compile: str = "auto") -> dict:
        """The settings a result reports (``exact`` is False only for ``adapt="online"``; ``compile`` the
        runtime's)."""
        return dict(
            num_chains=self.num_chains, num_steps=self.num_steps, num_leapfrog=self.num_leapfrog,
            step_size=self.step_size, schedule=self.schedule if isinstance(self.schedule, str) else "custom",
            adapt=self.adapt, pilot_chains=self.num_pilot_chains if self.adapt == "pilot" else None,
            pilot_steps=self.pilot_steps, exact=self.adapt != "online", compile=compile,
            precondition=self.precondition,
        )

    def run(self, density, proposal, x, z, runtime: Runtime = Runtime()) -> MIResult:
        return _bounds(self, density, proposal, x, z, runtime)


def ais_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``AIS(**options).run(...)``: the recommended IM-AIS sandwich of :class:`AIS`, options and runtime
    settings given by name (see :func:`~pyro_mi.bounds.declare`)."""
    return _shorthand("ais", density, proposal, x, z, args, options)


def im_ais_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """The same as :func:`ais_bounds` (IM-AIS, ``AIS(estimator="im")``)."""
    return _shorthand("im-ais", density, proposal, x, z, args, options)


def cr_ais_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``AIS(estimator="cr", **options).run(...)``: Coupled Reverse AIS bounds (:class:`AIS`)."""
    return _shorthand("cr-ais", density, proposal, x, z, args, options)


def bdmc_bounds(density: ModelDensity, proposal, x: Data, z: torch.Tensor, *args, **options) -> MIResult:
    """``AIS(estimator="bdmc", **options).run(...)``: Bidirectional Monte Carlo bounds (:class:`AIS`)."""
    return _shorthand("bdmc", density, proposal, x, z, args, options)


def _shorthand(name, density, proposal, x, z, args, options):
    from . import run_method

    return run_method(name, density, proposal, x, z, args, options)

__all__ = [
    "ADAPT_MODES", "AIS", "ESTIMATORS", "ais_bounds", "bdmc_bounds", "bdmc_log_px", "components_fn", "cr_ais_bounds",
    "cr_ais_log_px", "im_ais_bounds", "im_ais_log_px", "run_chains",
]
