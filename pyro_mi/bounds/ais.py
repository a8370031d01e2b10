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
import time
from typing import Callable

import pyro
import pyro.distributions as dist
import torch

from ..checkpoint import Checkpoint, check_output_path, finishing, fingerprint
from ..density import Data, ModelDensity, site_log_prob
from ..distributed import POINTS_PER_BLOCK, block_seed, check_points_per_block, map_blocks, seeded_global_rng
from ..proposal import GaussianEncoder, GuideDensity, PriorProposal, proposal_for_points, proposal_from_point
from ..recording import ChainRecorder, ChainSummary, ProgressBar
from ..result import MIResult, finite_side, require_finite
from ..samplers import StepSizeAdapter, anneal, freeze, get_schedule, hmc, pilot_step_sizes
from ..samplers.compile import COMPILE_MODES, compile_components, resolve_mode
from ..weights import importance_ess, log_mean_exp

#: default settings of the AIS methods. K is small because the interval for the model's MI is
#: set mostly by the number of data points, not by the gap: at equal seconds, N = 1024 points with
#: K = 4 gave a 95% interval 0.42 / 0.53 nats wide on linear-vae / digits-vae, N = 256 with K = 16
#: 0.82 / 0.77 (README, "Choosing N, K and T")
DEFAULTS = dict(num_chains=4, num_steps=100, num_leapfrog=2, step_size=0.05, schedule="sigmoid")
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
#: a warning is attached below this mean importance ESS of the forward weights
ESS_WARNING = 1.5


def components_fn(density: ModelDensity, proposal, x: Data) -> Callable:
    """``z (C, N, D) -> (log pi0(z), log p(x, z))``, each (C, N), for the AIS path.

    pi0 is the prior p(z) for a :class:`~pyro_mi.proposal.PriorProposal` (one model
    trace per call), else the proposal's ``log_prob(z, x)`` (for a
    :class:`~pyro_mi.proposal.GaussianEncoder` its network runs once here, since x is
    fixed along the path, and its mixture's prior component reads log p(z) from the same
    model trace). Pyro's argument validation is switched off inside, so that
    a chain stepping into a region of zero density gets -inf (and is rejected)
    instead of raising.
    """
    x = density.check_data(x)
    if isinstance(proposal, PriorProposal):

        def components(z):
            with pyro.validation_enabled(False):
                lp, ll = density.log_terms(x, z)
            return lp, lp + ll

    elif type(proposal) is GaussianEncoder:
        with torch.no_grad():
            mu, sigma = proposal(x)
        q = dist.Normal(mu, sigma, validate_args=False).to_event(1)

        def components(z):
            with pyro.validation_enabled(False):
                lp, ll = density.log_terms(x, z)
            return proposal.mix(site_log_prob(q, z), z, x, lp), lp + ll

    else:

        def components(z):
            with pyro.validation_enabled(False):
                lp, ll = density.log_terms(x, z)
                lq = proposal.log_prob(z, x)
            return lq, lp + ll

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
class _MeanLogStepSize:
    """Online mode: sum over forward chains of the log step size used at each transition."""

    def __init__(self):
        self.data: dict = {}

    def __call__(self, key, state, info) -> None:
        if info.hmc is None:
            return
        d = self.data.setdefault(key, {})
        d[state.step] = d.get(state.step, 0) + info.step_size.log().sum(0)

    def table(self, num_betas: int, num_chains: int) -> torch.Tensor:
        T = num_betas - 1
        sums = [sum(d[j] for d in self.data.values()) / num_chains for j in range(1, T)]
        return freeze(torch.arange(1, T), torch.stack(sums), num_betas)


def run_chains(
    components: Callable,
    draw_pi0: Callable[[int], torch.Tensor],
    z: torch.Tensor,
    betas: torch.Tensor,
    *,
    num_forward: int,
    num_reverse: int,
    num_reverse_from_forward: int = 0,
    num_leapfrog: int,
    step_size: float,
    adapt: str = "pilot",
    pilot_chains: int = 8,
    pilot_steps: int | None = None,
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
    ELBO, eq. 16). Step sizes come from ``adapt`` (see the module docstring). Chains
    run in sequential chunks of at most ``max_chains_per_chunk``; each chunk's random
    numbers come from its own generator seeded from (``seed``, job, chunk), so a run is
    reproducible and a resumed run equals the uninterrupted one. Every step is passed to
    the ``observers`` (``observer(key, state, info)``, ``key = (job, chunk, block)``); with
    ``checkpoint`` (a part of the run's file), progress (and the observers' ``data`` of this
    ``block``) is saved every ``checkpoint_every`` seconds, on KeyboardInterrupt and at the
    end, and a run with the same checkpoint resumes it or returns the saved outputs.

    Returns:
        dict with ``forward`` (num_forward, N), ``reverse`` (num_reverse, N) and
        ``reverse_from_forward`` (num_reverse_from_forward, N) log weights (nats),
        ``step_sizes`` (T + 1, N) (the frozen table; for ``online`` the one the reverse
        chains used), ``keys`` (the chunks of the bound-bearing chains) and ``posterior``
        (``{key: draws}`` of the chunks with forward chains, with ``posterior_draws``).
    """
    N, D = z.shape
    T = betas.numel() - 1
    payload = (checkpoint.payload if checkpoint is not None else None) or {"completed": {}, "current": None}
    observers = tuple(observers)
    for i, obs in enumerate(observers):
        if hasattr(obs, "data") and "observers" in payload:
            obs.data.update(payload["observers"][i] or {})
    last = {"save": time.monotonic()}

    def save() -> None:
        payload["observers"] = [{k: v for k, v in o.data.items() if k[-1] == block} if hasattr(o, "data") else None
                                for o in observers]
        current = payload["current"]
        payload["progress"] = (bool(payload.get("done")), len(payload["completed"]),
                               current[1].step if current is not None else -1)
        checkpoint.save(payload)
        last["save"] = time.monotonic()

    def run_job(name: str, inits: list, step_sizes, adapter=None, extra=()) -> list:
        """inits: [(kind, start z (N, D) or None, count)]; returns the chunks' outputs."""
        flat = [(kind, start) for kind, start, count in inits for _ in range(count)]
        outs = []
        for c, lo in enumerate(range(0, len(flat), max_chains_per_chunk)):
            key = (name, c, block)
            if key in payload["completed"]:
                outs.append(payload["completed"][key])
                continue
            part = flat[lo : lo + max_chains_per_chunk]
            reverse = torch.tensor([kind == "rev" for kind, _ in part], device=z.device)
            gen = torch.Generator(device=z.device)
            current = payload["current"]
            if current is not None and current[0] == key:
                state, z_init = current[1], current[1].hmc.z
                gen.set_state(current[2])
            else:
                state = None
                gen.manual_seed(block_seed(seed, name, c))
                n_fwd = int((~reverse).sum())
                with torch.no_grad(), seeded_global_rng(block_seed(seed, name, c, "pi0"), z.device):
                    z_f = draw_pi0(n_fwd) if n_fwd else z.new_zeros(0, N, D)
                z_r = [start.unsqueeze(0) for kind, start in part if kind == "rev"]
                z_init = torch.cat([z_f] + z_r, 0)  # ``flat`` lists a job's forward chains first

            def on_step(st, info, key=key, gen=gen):
                payload["current"] = (key, st, gen.get_state())
                for obs in extra + observers:
                    obs(key, st, info)
                if checkpoint is not None and time.monotonic() - last["save"] >= checkpoint_every:
                    save()

            with torch.no_grad():
                final = anneal(components, z_init, reverse, betas, step_sizes, num_leapfrog, gen,
                               adapter=adapter, state=state, on_step=on_step)
            fwd_idx = (~reverse).nonzero()
            out = {
                "log_weights": final.log_weights,
                "reverse": reverse,
                "first_forward": final.hmc.z[int(fwd_idx[0])] if fwd_idx.numel() else None,
            }
            if posterior_draws and fwd_idx.numel():
                out["posterior"] = posterior_draws_of(components, final, ~reverse, posterior_draws, num_leapfrog, gen)
            payload["completed"][key] = out
            payload["current"] = None
            outs.append(out)
        return outs

    try:
        table = payload.get("step_sizes")
        if adapt == "pilot" and table is None:
            gen = torch.Generator(device=z.device).manual_seed(block_seed(seed, "pilot"))
            with torch.no_grad(), seeded_global_rng(block_seed(seed, "pilot", "pi0"), z.device):
                z_p = draw_pi0(pilot_chains)
            bars = [o for o in observers if isinstance(o, ProgressBar)]  # the pilot is shown, not recorded

            def pilot_step(st, info):
                for bar in bars:
                    bar(("pilot", 0, block), st, info)

            table, pilot_weights = pilot_step_sizes(components, z_p, betas, step_size, num_leapfrog, gen,
                                                    num_pilot_steps=pilot_steps, on_step=pilot_step,
                                                    return_weights=True)
            # how far the pilot ended from each point's target: the Jensen gap of its log weights
            gap = log_mean_exp(pilot_weights, 0) - pilot_weights.mean(0)
            payload["pilot_gap"] = torch.nan_to_num(gap, nan=math.inf)
        elif adapt == "none":
            table = z.new_full((T + 1, N), float(step_size))
        payload["step_sizes"] = table
        if adapt == "online":
            mean_eps = payload.setdefault("mean_log_step_size", _MeanLogStepSize())
            adapter = StepSizeAdapter("multiplicative", 1.02)
            main = run_job("main", [("fwd", None, num_forward)], step_size, adapter, extra=(mean_eps,))
            table = payload["step_sizes"] = mean_eps.table(T + 1, num_forward) if T > 1 else z.new_full(
                (T + 1, N), float(step_size))
            main += run_job("rev", [("rev", z, num_reverse)], table)
        else:
            main = run_job("main", [("fwd", None, num_forward), ("rev", z, num_reverse)], table)
        cr = []
        if num_reverse_from_forward > 0:
            start = next(o["first_forward"] for o in main if o["first_forward"] is not None)
            cr = run_job("cr", [("rev", start, num_reverse_from_forward)], table)
    except KeyboardInterrupt:
        if checkpoint is not None:
            save()
            checkpoint.release()
        raise
    except BaseException:
        if checkpoint is not None:
            checkpoint.release()
        raise
    if checkpoint is not None:
        payload["done"] = True
        try:
            save()
        except ValueError:  # the disk filled at the end: the results are in hand, the file keeps its last save
            pass

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


def posterior_draws_of(components: Callable, final, forward: torch.Tensor, num_draws: int, num_leapfrog: int,
                       generator: torch.Generator) -> dict:
    """``num_draws`` HMC transitions at beta = 1 of the ``forward`` chains of a finished chunk (``final``,
    an AISState), at the step size each used last: ``{"z": (M, C_fwd, N, D), "accept_prob", "diverging",
    "step_size": (M, C_fwd, N)}``. The chains' weights are final; the draws serve diagnostics only."""
    state = hmc.HMCState(*(t[forward] for t in final.hmc))
    eps = final.step_size[forward]
    zs, accept, diverging = [], [], []
    with torch.no_grad():
        for _ in range(num_draws):
            state, info = hmc.step(state, components, 1.0, eps, num_leapfrog, generator)
            zs.append(state.z)
            accept.append(info.accept_prob)
            diverging.append(info.diverging)
    return {"z": torch.stack(zs), "accept_prob": torch.stack(accept), "diverging": torch.stack(diverging),
            "step_size": eps.expand(num_draws, *eps.shape).clone()}


# --------------------------------------------------------------------- bounds
#: method -> (chain plan for K chains, estimator)
_PLANS = {
    "im-ais": (lambda K: dict(num_forward=K, num_reverse=1), lambda r: im_ais_log_px(r["forward"], r["reverse"])),
    "cr-ais": (
        lambda K: dict(num_forward=1, num_reverse=K, num_reverse_from_forward=K - 1),
        lambda r: cr_ais_log_px(r["forward"], r["reverse"], r["reverse_from_forward"]),
    ),
    "bdmc": (lambda K: dict(num_forward=K, num_reverse=K), lambda r: bdmc_log_px(r["forward"], r["reverse"])),
}
_KIND = {"ais": "im-ais", "im-ais": "im-ais", "cr-ais": "cr-ais", "bdmc": "bdmc"}


def check_options(num_chains, num_steps, num_leapfrog, step_size, adapt, pilot_chains, pilot_steps,
                  compile="auto") -> int:
    """Validates the options; returns the number of pilot chains (default 8)."""
    if compile not in ("auto",) + COMPILE_MODES:
        raise ValueError(f"compile must be 'auto' or one of {COMPILE_MODES}, got {compile!r}")
    if adapt not in ADAPT_MODES:
        raise ValueError(f"adapt must be one of {ADAPT_MODES}, got {adapt!r}")
    if adapt != "pilot" and (pilot_chains is not None or pilot_steps is not None):
        raise ValueError(f"pilot_chains and pilot_steps apply only to adapt='pilot', not adapt={adapt!r}")
    pilot_chains = 8 if pilot_chains is None else pilot_chains
    for name, v in (("num_chains", num_chains), ("num_steps", num_steps), ("num_leapfrog", num_leapfrog),
                    ("pilot_chains", pilot_chains), ("pilot_steps", 1 if pilot_steps is None else pilot_steps)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not isinstance(step_size, (int, float)) or not 0 < step_size < float("inf"):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    return pilot_chains


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
    :func:`posterior_draws_of`), joined the same way."""
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
    *,
    kind: str,
    num_chains: int,
    num_steps: int,
    num_leapfrog: int,
    step_size: float,
    schedule,
    adapt: str,
    pilot_chains: int,
    pilot_steps: int | None,
    seed: int,
    checkpoint,
    checkpoint_every: float,
    record: bool,
    max_chains_per_chunk: int,
    callback: Callable | None,
    progress: bool,
    constrained: Callable,
    compile: str = "auto",
    points_per_block: int = POINTS_PER_BLOCK,
    gather: bool = True,
) -> dict:
    """Multi-sample AIS bounds on log Z(x) = log ∫ gamma(z) dz for every data point.

    The shared engine of the AIS front ends: it runs the chains of estimator ``kind``
    (``"im-ais"``, ``"cr-ais"`` or ``"bdmc"``, see :data:`_PLANS`) from pi0 to gamma, and
    checks and summarises them. The N points run in blocks of ``points_per_block``
    (:mod:`pyro_mi.distributed`: under ``torch.distributed`` each rank runs its blocks and
    every rank gets all of them; a block's random numbers come from (``seed``, block), so
    the numbers do not depend on the number of processes). ``path_of(lo, hi)`` gives the
    path of the points lo..hi-1: ``(components, draw_pi0)`` with ``components(z) ->
    (log pi0, log gamma)`` and forward chains from ``draw_pi0(n)``; reverse chains start at
    z (N, D). Other arguments as in :func:`ais_bounds`; ``checkpoint`` is a
    :class:`~pyro_mi.checkpoint.Checkpoint` (or a part of one) that holds a part per block
    (the caller finishes it); ``constrained`` maps packed z to constrained sites (for the
    chain record); ``compile`` says how the kernels evaluate ``components``
    (:mod:`pyro_mi.samplers.compile`; ``"auto"`` traces long runs); ``gather=False`` runs
    every block in this process.

    Returns:
        dict with ``lower`` and ``upper`` (N,) bounds on log Z(x) (nats; the upper one
        holds if z are exact samples of the normalised gamma), ``betas``,
        ``diagnostics`` (ESS, log weights, step sizes, chain statistics, and
        ``chains`` when ``record``), ``warnings`` (divergent chains, low ESS,
        the approximate online mode) and ``notes`` (a trace that fell back to eager).
    """
    N, D = z.shape
    betas = get_schedule(schedule, num_steps)
    plan, estimator = _PLANS[kind]
    summary = ChainSummary()
    recorder = ChainRecorder(num_steps) if record else None
    jobs = plan(num_chains)
    chains = ([jobs["num_forward"], jobs["num_reverse"]] if adapt == "online"
              else [jobs["num_forward"] + jobs["num_reverse"]]) + [jobs.get("num_reverse_from_forward", 0)]
    steps = sum(-(-c // max_chains_per_chunk) for c in chains if c) * (betas.numel() - 1)
    bar = ProgressBar(steps * len(range(0, N, points_per_block)), progress)
    observers = tuple(o for o in (summary, recorder, bar, callback) if o is not None)
    kept = [o for o in (summary, recorder) if o is not None]  # observers whose records are gathered
    mode = resolve_mode(compile, num_steps, num_leapfrog)

    def run_block(b: int, lo: int, hi: int) -> dict:
        components, draw_pi0 = path_of(lo, hi)
        components = compile_components(components, mode, num_steps)
        with pyro.validation_enabled(False):
            run = run_chains(
                components, draw_pi0, z[lo:hi], betas, **plan(num_chains), num_leapfrog=num_leapfrog,
                step_size=step_size, adapt=adapt, pilot_chains=pilot_chains, pilot_steps=pilot_steps,
                seed=block_seed(seed, "block", b), max_chains_per_chunk=max_chains_per_chunk,
                checkpoint=checkpoint.section(f"block:{b}") if checkpoint is not None else None,
                checkpoint_every=checkpoint_every, observers=observers, block=b,
                posterior_draws=POSTERIOR_DRAWS if record else 0,
            )
        run["records"] = [{k: v for k, v in o.data.items() if k[-1] == b} for o in kept]
        run["notes"] = list(getattr(components, "notices", []))
        return run

    try:
        blocks = map_blocks(run_block, N, points_per_block, device=z.device, gather=gather)
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
    warnings = []
    if adapt == "online":
        warnings.append("adapt='online' adapts step sizes along each chain's own path, which biases the AIS "
                        "weights: these bounds are approximate, not guaranteed (adapt='pilot' is exact)")
    for name, what, advice in (
            ("divergent_chains", "diverged (over 10% of their HMC transitions rejected as divergent)",
             "a smaller step_size (adapt='none'), more num_steps, or a proposal closer to the posterior"),
            ("stuck_chains", "never accepted a move, so their weights come from where they started",
             "more num_steps (smaller steps between betas), or a proposal closer to the posterior")):
        count = chain_stats.get(name)
        if count is None or not int(count.sum()):
            continue
        points = count.nonzero().flatten()
        listed = ", ".join(str(int(i)) for i in points[:5])
        total = fwd.shape[0] + run["reverse"].shape[0] + run["reverse_from_forward"].shape[0]
        warnings.append(
            f"{int(count.sum())} of {total * N} chains ({int(count.sum()) / (total * N):.2%}) {what}, at "
            f"{points.numel()} points (first: {listed}): the bounds stay valid but may be loose there; try {advice}")
    if num_steps > 1 and fwd.shape[0] > 1 and float(ess.mean()) < ESS_WARNING:
        warnings.append(
            f"the importance ESS of the forward chains' weights is {float(ess.mean()):.2f} on average (below "
            f"{ESS_WARNING}): one chain dominates each AIS estimate, so the bounds may be loose; "
            "try more num_steps or num_chains")
    if recorder is not None:
        diagnostics["chains"] = _chains(constrained, recorder, run["keys"], run["reverse_flags"], betas,
                                        run["posterior"])
    notes = list(dict.fromkeys(n for blk in blocks for n in blk["notes"]))
    return {"lower": lower, "upper": upper, "betas": betas, "diagnostics": diagnostics, "warnings": warnings,
            "notes": notes}


def _bounds(
    method: str,
    density: ModelDensity,
    proposal,
    x: Data,
    z: torch.Tensor,
    *,
    num_chains: int,
    num_steps: int,
    num_leapfrog: int,
    step_size: float,
    schedule,
    adapt: str,
    pilot_chains: int | None,
    pilot_steps: int | None,
    generator: torch.Generator | None,
    checkpoint,
    checkpoint_every: float,
    save_chains,
    record: bool,
    max_chains_per_chunk,
    callback,
    progress: bool,
    compile: str,
    points_per_block: int,
    refine: float,
) -> MIResult:
    check_points_per_block(points_per_block)
    if isinstance(refine, bool) or not isinstance(refine, (int, float)) or not 0 <= refine <= 1:
        raise ValueError(f"refine must be a fraction of the points in [0, 1], got {refine!r}")
    pilot_chains = check_options(num_chains, num_steps, num_leapfrog, step_size, adapt, pilot_chains, pilot_steps,
                                 compile)
    if save_chains is not None:
        check_output_path(save_chains, "save_chains")
    x = density.check_data(x)
    seed = int(torch.randint(2**62, (1,), generator=generator))
    settings = ais_settings(num_chains, num_steps, num_leapfrog, step_size, schedule, adapt, pilot_chains,
                            pilot_steps, compile)
    settings["refine"] = refine
    record = record or save_chains is not None
    ckpt = None
    if checkpoint is not None:
        fp = fingerprint(method, settings, seed, get_schedule(schedule, num_steps), x, z,
                         proposal_identity(proposal), density.model, density.model_args, density.model_kwargs,
                         record, points_per_block)
        ckpt = Checkpoint(checkpoint, fp)
    with torch.no_grad(), pyro.validation_enabled(False):
        log_lik = density.log_terms(x, z)[1]

    def paths(d, q0, xs):
        def path_of(lo, hi):
            xb, q = {k: v[lo:hi] for k, v in xs.items()}, proposal_from_point(q0, lo)
            return components_fn(d.from_point(lo), q, xb), lambda n: q.rsample(xb, n)[0].detach()

        return path_of

    run = dict(kind=_KIND[method], num_chains=num_chains, num_leapfrog=num_leapfrog, step_size=step_size,
               schedule=schedule, adapt=adapt, pilot_chains=pilot_chains, checkpoint_every=checkpoint_every,
               callback=callback, progress=progress, constrained=density.constrained, compile=compile,
               points_per_block=points_per_block,
               max_chains_per_chunk=max_chains_per_chunk or default_chunk(density, min(z.shape[0], points_per_block)))
    with finishing(ckpt):
        ais = anneal_log_normalizer(paths(density, proposal, x), z, num_steps=num_steps, pilot_steps=pilot_steps,
                                    seed=seed, checkpoint=ckpt, record=record, **run)
        index = refined_points(ais["diagnostics"].get("pilot_gap"), refine)
        if index is not None:  # the points the pilot found far from their target: rerun with REFINE_FACTOR x T
            sub = anneal_log_normalizer(
                paths(density.for_points(index), proposal_for_points(proposal, index), {k: v[index] for k, v in x.items()}),
                z[index], num_steps=num_steps * REFINE_FACTOR, pilot_steps=None, seed=block_seed(seed, "refine"),
                checkpoint=ckpt.section("refine") if ckpt is not None else None, record=False, **run)
            _replace_points(ais, sub, index)
            settings["refined_points"] = int(index.numel())
            ais["notes"].append(
                f"{index.numel()} of {z.shape[0]} points, those whose pilot ended farthest from their target (a Jensen "
                f"gap of its log weights above {REFINE_MIN_GAP:g} nats), were rerun with T = {num_steps * REFINE_FACTOR} "
                "annealing steps and their first run dropped (the choice depends on x and the pilot only, so every "
                "bound holds); indices in diagnostics['refined_points']")
            ais["diagnostics"]["refined_points"] = index.tolist()
            if record:
                ais["notes"].append("the recorded chains of the refined points are those of their first run (dropped "
                                    "from the bounds); their per-point values are the rerun's")
    elbo, eubo = ais["lower"], ais["upper"]
    require_finite(method, {"log p(x|z) of the simulated points": log_lik})
    advice = "use a proposal closer to the posterior, or more num_steps"
    lower, no_lower = finite_side(method, "lower", log_lik - eubo, "a reverse chain's weight is infinite", advice)
    upper, no_upper = finite_side(method, "upper", log_lik - elbo, "every forward chain has zero weight", advice)
    diagnostics = {"log_p_x_lower": elbo, "log_p_x_upper": eubo, **ais["diagnostics"]}
    draws = diagnostics.get("chains", {}).get("posterior")
    if draws is not None:  # log p(x_i|z) at each posterior draw, for ArviZ's log_likelihood group
        packed = draws.pop("packed")
        with torch.no_grad(), pyro.validation_enabled(False):
            draws["log_likelihood"] = density.log_terms(x, packed)[1]
    result = MIResult(method, lower_per_point=lower, upper_per_point=upper, settings=settings, diagnostics=diagnostics,
                      warnings=ais["warnings"] + no_lower + no_upper, notes=ais["notes"], x=x, z=z)
    if save_chains is not None:
        from ..diagnostics import write_chains

        write_chains(result, save_chains)
    return result


#: a point is rerun (``refine``) when its pilot's log weights have a Jensen gap above this (nats) ...
REFINE_MIN_GAP = 10.0
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


def _replace_points(ais: dict, sub: dict, index: torch.Tensor) -> None:
    """Puts a rerun's per-point bounds and diagnostics (of the points ``index``) in place of the first run's
    (but the step sizes, of another schedule, and the first pilot's gap, which chose the points)."""
    for side in ("lower", "upper"):
        ais[side] = ais[side].clone()
        ais[side][index] = sub[side]
    d, s = ais["diagnostics"], sub["diagnostics"]
    for key, v in s.items():
        if isinstance(v, torch.Tensor) and key in d and isinstance(d[key], torch.Tensor) \
                and key not in ("step_sizes", "pilot_gap") \
                and v.dim() and d[key].dim() == v.dim() and d[key].shape[-1] == ais["lower"].numel() \
                and v.shape[:-1] == d[key].shape[:-1]:
            d[key] = d[key].clone()
            d[key][..., index] = v
    d["ess"] = float(d["ess_per_point"].mean())


def ais_settings(num_chains, num_steps, num_leapfrog, step_size, schedule, adapt, pilot_chains, pilot_steps,
                 compile="auto") -> dict:
    """The AIS settings a result reports (``exact`` is False only for ``adapt="online"``)."""
    return dict(
        num_chains=num_chains, num_steps=num_steps, num_leapfrog=num_leapfrog, step_size=step_size,
        schedule=schedule if isinstance(schedule, str) else "custom", adapt=adapt,
        pilot_chains=pilot_chains if adapt == "pilot" else None, pilot_steps=pilot_steps, exact=adapt != "online",
        compile=compile,
    )


def default_chunk(density: ModelDensity, num_data: int) -> int:
    """Chains per chunk so that a chunk holds at most :data:`CHUNK_ELEMENTS` (chain, point, dim) elements."""
    return max(1, CHUNK_ELEMENTS // (num_data * max(density.latent_dim, density.obs_dim)))


def _make(method: str, doc: str):
    def bound(
        density: ModelDensity,
        proposal,
        x: Data,
        z: torch.Tensor,
        num_chains: int = DEFAULTS["num_chains"],
        num_steps: int = DEFAULTS["num_steps"],
        num_leapfrog: int = DEFAULTS["num_leapfrog"],
        step_size: float = DEFAULTS["step_size"],
        schedule="sigmoid",
        *,
        adapt: str = "pilot",
        pilot_chains: int | None = None,
        pilot_steps: int | None = None,
        generator: torch.Generator | None = None,
        checkpoint: str | None = None,
        checkpoint_every: float = 60.0,
        save_chains: str | None = None,
        record: bool = False,
        max_chains_per_chunk: int | None = None,
        callback: Callable | None = None,
        progress: bool = True,
        compile: str = "auto",
        points_per_block: int = POINTS_PER_BLOCK,
        refine: float = REFINE,
    ) -> MIResult:
        return _bounds(
            method, density, proposal, x, z, num_chains=num_chains, num_steps=num_steps,
            num_leapfrog=num_leapfrog, step_size=step_size, schedule=schedule, adapt=adapt,
            pilot_chains=pilot_chains, pilot_steps=pilot_steps, generator=generator, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, save_chains=save_chains, record=record,
            max_chains_per_chunk=max_chains_per_chunk, callback=callback, progress=progress,
            compile=compile, points_per_block=points_per_block, refine=refine,
        )

    bound.__doc__ = doc + _COMMON_DOC
    bound.__name__ = bound.__qualname__ = method.replace("-", "_") + "_bounds"
    return bound


_COMMON_DOC = """

    Args:
        density: the model's :class:`~pyro_mi.density.ModelDensity`.
        proposal: pi0, the start of the annealing path: a prior, guide or encoder
            proposal (:mod:`pyro_mi.proposal`).
        x: simulated observations ``{site: (N, ...)}``.
        z: the packed latents (N, D) that generated x (posterior samples; every reverse
            chain starts there).
        num_chains: K, AIS chains per data point (per direction).
        num_steps: T, annealing steps (T - 1 HMC transitions per chain; T = 1 is IWAE).
        num_leapfrog: L, leapfrog steps per HMC transition (one model trace each).
        step_size: the HMC step size with ``adapt="none"``; where the pilot's search starts
            with ``"pilot"``; the initial one with ``"online"``.
        schedule: ``"sigmoid"`` (Wu et al. 2017, radius 4), ``"linear"``, or betas (T + 1,).
        adapt: ``"pilot"`` (exact: step sizes tuned in a pilot, then frozen), ``"none"``
            (exact: ``step_size`` throughout) or ``"online"`` (approximate; labelled so).
        pilot_chains, pilot_steps: the pilot's forward chains per data point (default 8)
            and annealing steps (default ceil(T / 5), at least 5); only with ``"pilot"``.
        generator: the ``torch.Generator`` the run's seed is drawn from (None: torch's
            global generator, one draw); chunks and the pilot get their own generators.
        checkpoint: file to save progress to every ``checkpoint_every`` seconds and on
            KeyboardInterrupt; the same call resumes from it (and deletes it when done).
            Refused if another process holds it or a different run wrote it.
        save_chains: write the chains as ArviZ InferenceData to this ``.nc`` file
            (checked for writability before the run).
        record: keep per-step chain statistics and thinned states (for ``to_arviz``);
            off by default so that memory stays flat in T.
        max_chains_per_chunk: run the chains in sequential chunks of at most this many.
        callback: ``callback(key, AISState, StepInfo)`` after every annealing step.
        progress: show a progress bar over annealing steps.
        compile: how the HMC kernels evaluate the densities (:mod:`pyro_mi.samplers.compile`):
            ``"none"`` (a Pyro trace per leapfrog step), ``"trace"`` (a graph recorded once
            and checked against the eager densities), ``"inductor"`` (that graph compiled by
            ``torch.compile``; CUDA graphs on CUDA), or ``"auto"``: ``"trace"`` when T x L >= 1500,
            where its one-off cost (seconds) pays. The numbers are the same (bit for bit
            with ``"trace"``, to rounding with ``"inductor"``).
        points_per_block: the points are run in blocks of this many, each with random numbers
            of its own (:mod:`pyro_mi.distributed`); under ``torchrun`` the ranks share the
            blocks out, and the numbers are the same for any number of processes.
        refine: with ``adapt="pilot"``, at most this fraction of the points, those whose pilot
            ended farthest from their target (the Jensen gap of its log weights, above
            :data:`REFINE_MIN_GAP` nats), are rerun with :data:`REFINE_FACTOR` times the steps,
            their first run dropped: the few points of a heavy-tailed prior that carry most of a
            gap get the steps they need. The choice depends on x and the pilot only, so the
            bounds hold. 0: none; not with ``record`` or ``save_chains``.

    Returns:
        :class:`~pyro_mi.result.MIResult` (nats) whose ``diagnostics`` hold ``ess`` (mean
        importance ESS of the forward chains' final weights), ``accept_rate``,
        ``divergences``, ``divergent_chain_fraction``, ``step_sizes`` (T + 1, N), the log
        weights, the log p(x) bounds per point and, with ``record``, ``chains`` (for
        :meth:`~pyro_mi.result.MIResult.to_arviz`); ``warnings`` name divergent chains and
        chains that never moved (and the points they belong to), a low ESS (< 1.5) and the
        approximate online mode.

    Raises:
        ValueError: non-positive K, T, L or step size, an unknown schedule or adapt mode,
            pilot options with another adapt mode,
            an unwritable, foreign or busy checkpoint, an unwritable ``save_chains``, shape
            mismatches of x and z, a non-finite bound (naming its cause), ``points_per_block`` < 1.
        DistributedError: under ``torch.distributed``, another rank died or timed out.
"""

im_ais_bounds = _make(
    "im-ais",
    """Independent Multi-Sample AIS bounds on I(x; z) (Brekelmans et al. 2022, eq. 13–14, App. E).

    MI upper = log p(x|z) - log (1/K) sum_k w_k (K forward chains, eq. 14 left);
    MI lower = log p(x|z) - log (1/K) (w_rev + sum_{k<K} w_k) (one reverse chain from the
    simulated z plus K-1 forward chains, eq. 14 right). T = 1 gives IWAE, K = 1
    single-chain AIS. Cost: K + 1 chains.""",
)
cr_ais_bounds = _make(
    "cr-ais",
    """Coupled Reverse Multi-Sample AIS bounds on I(x; z) (Brekelmans et al. 2022, eq. 15–17, App. H).

    MI lower = log p(x|z) + log (1/K) sum_k 1/w_k^rev (K reverse chains from the simulated z);
    MI upper = log p(x|z) + log (1/K) (1/w^fwd + sum_{k<K} 1/w_k^rev) (one forward chain,
    then K-1 reverse chains from its final state). Cost: 2K chains, two sequential phases.""",
)
bdmc_bounds = _make(
    "bdmc",
    """Bidirectional Monte Carlo bounds on I(x; z) (Grosse et al. 2015; Brekelmans et al. 2022, sec. 3.4).

    MI upper from the IM-AIS ELBO (K forward chains, eq. 14 left), MI lower from the
    CR-AIS EUBO (K reverse chains from the simulated z, eq. 17). Cost: 2K chains.""",
)
ais_bounds = _make(
    "ais",
    """The recommended AIS sandwich on I(x; z): IM-AIS (Brekelmans et al. 2022, eq. 14, sec. 3.4).

    MI upper from the IM-AIS ELBO (K forward chains, eq. 14 left; the paper's
    recommendation) and MI lower from the IM-AIS EUBO (one reverse chain plus the K-1
    forward chains, eq. 14 right), which costs K + 1 chains instead of BDMC's 2K.
    Same numbers as :func:`im_ais_bounds`.""",
)

__all__ = [
    "ADAPT_MODES", "DEFAULTS", "ais_bounds", "bdmc_bounds", "bdmc_log_px", "components_fn", "cr_ais_bounds",
    "cr_ais_log_px", "im_ais_bounds", "im_ais_log_px", "run_chains",
]
