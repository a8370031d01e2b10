# %% [markdown]
# # MINE-AIS: an energy-based posterior, evaluated by AIS (Brekelmans et al. 2022, Fig. 3a and Fig. 7)
#
# For a model whose prior p(z) is known and which can be simulated, but whose likelihood
# p(x|z) is not used, MINE-AIS (sec. 4, App. M) learns a base q(z|x) and a critic T(x, z)
# that together define the energy-based posterior π(z|x) = q(z|x) e^{T(x, z)} / Z(x), and
# bounds the MI by the implicit Barber–Agakov bound (eq. 18)
#
#     IBAL(q, T) = E[log q(z|x) - log p(z) + T(x, z)] - E[log Z(x)] <= I(x; z).
#
# * **Training** (eq. 19–20, App. M.1): raise log q + T on simulated pairs, lower it on
#   negatives drawn by a few HMC transitions targeting π(z|x), started at the simulated z.
# * **Evaluation** (App. M.2): log Z(x) = log E_q[e^T] by multi-sample AIS on the path
#   q -> q e^T. Reverse chains started at the simulated z (exact p(z|x) samples) give the
#   reported `lower`, a bound on the MI under Prop. M.1's condition (printed in the result's
#   `notes`); forward chains give `ibal_upper`, an upper bound on the IBAL (not on the MI):
#   when the two meet, AIS has converged and the number is the IBAL of the learned (q, T).
#   At T = 1 annealing step the lower is a GIWAE bound with K = num_chains of the same (q, T).
#
# The rows of Fig. 3a compared here, on the same N simulated pairs for every bound:
#
# | row | uses p(x\|z)? | what |
# |---|---|---|
# | Barber–Agakov (BA) | no | E[log q(z\|x) - log p(z)], q a Gaussian encoder fitted by `fit_guide` |
# | GIWAE K = 100, 1000 | no | BA + contrastive term (eq. 7), q and critic trained jointly |
# | InfoNCE K = 100 | no | GIWAE with q = p(z): at most log K |
# | MINE-AIS, likelihood critic | no | the library's default: base = the fitted encoder, T = log N(x; f(z), diag s²) + log p(z) - log q(z\|x), f and s fitted by maximum likelihood on simulated pairs, no energy-based steps |
# | MINE-AIS, base q | no | base = the fitted encoder, residual critic on (z - mu_q(x)) / sigma_q(x), energy-based training |
# | MINE-AIS, base p(z) | no | the paper's setting: base = the prior, an MLP critic on [x, z], energy-based training |
# | AIS on IBAL of GIWAE / InfoNCE (K = 100) | no | the trained (q, T) of those rows, evaluated by AIS instead of with K samples |
# | AIS sandwich | **yes** | multi-sample AIS on log p(x) (the reference) |
# | IWAE K = 1000 | **yes** | the optimal critic of GIWAE (Cor. 2.2) |
#
# Models: (a) `linear-vae` (z ∈ R¹⁰, x ∈ R¹⁰⁰, analytic MI), (b) `digits-gan` (a WGAN-GP
# generator on the 8x8 digits with Gaussian noise 0.1; no analytic MI, the AIS sandwich
# is the reference).
#
# Settings (full mode): N = 512 evaluation pairs; q a GaussianEncoder fitted for 2000
# steps; GIWAE / InfoNCE critics (64, 64), up to 1000 training steps of batch 64; the
# likelihood critic: f (128, 128), up to 2000 steps of 512 fresh pairs; MINE-AIS with
# base q: critic (128, 128), up to 1500 steps (batch 128, lr 3e-3, 5 HMC transitions of 2
# leapfrog steps per negative); MINE-AIS with base p(z): critic (128, 128), up to 1000
# steps with lr 3e-4 and 5 leapfrog steps per transition (with lr 3e-3 and 2 leapfrog
# steps, training with the prior base stalled in our trials); every IBAL row
# evaluated with 4 chains and T = 300 annealing steps; the AIS sandwich with 4 chains and
# T = 1000 from the fitted encoder; early stopping on simulated validation pairs.
# The paper used critics of width 2000, HMC with 20 leapfrog steps and up to 50 000
# annealing steps: expect our numbers to be looser. All of it runs in well under 10
# minutes on a 2-core CPU; `PYRO_MI_TUTORIAL_FAST=1` runs a tiny smoke version.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyro_mi import GaussianEncoder, ModelDensity, fit_guide  # noqa: E402
from pyro_mi.bounds import (ais_bounds, ba_bounds, giwae_bounds, ibal_bounds, infonce_bounds,  # noqa: E402
                            iwae_bounds, mine_ais_bounds)
from pyro_mi.bounds.giwae import giwae_terms  # noqa: E402
from pyro_mi.examples import get_example  # noqa: E402
from pyro_mi.proposal import PriorProposal  # noqa: E402

FAST = os.environ.get("PYRO_MI_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("PYRO_MI_TUTORIAL_OUTPUT", Path(__file__).resolve().parent / "output"))
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # small tensors: one thread is fastest on a shared CPU
T_START = time.perf_counter()

NUM_DATA = 64 if FAST else 512
FIT_STEPS = 100 if FAST else 2000
GIWAE_K = [10, 30] if FAST else [100, 1000]  # the first K also serves InfoNCE and the IBAL rows
IWAE_K = 100 if FAST else 1000
NUM_CHAINS = 4
EVAL_T = 30 if FAST else 300  # annealing steps of every IBAL row in the table
SWEEP_T = [1, 10, 30] if FAST else [1, 10, 30, 100, 300]  # Fig. 7
SANDWICH_T = 30 if FAST else 1000
GIWAE_TRAIN = dict(max_steps=20 if FAST else 1000, batch_size=16 if FAST else 64,
                   hidden_sizes=(32, 32) if FAST else (64, 64), lr=1e-3, eval_every=10 if FAST else 100,
                   num_val=32 if FAST else 256, patience=5, progress=False)
MINE_COMMON = dict(num_chains=NUM_CHAINS, num_steps=EVAL_T, hidden_sizes=(32, 32) if FAST else (128, 128),
                   eval_every=10 if FAST else 100, num_val=32 if FAST else 128, val_steps=10 if FAST else 100,
                   progress=False)
MINE_LIKELIHOOD = dict(num_chains=NUM_CHAINS, num_steps=EVAL_T, hidden_sizes=MINE_COMMON["hidden_sizes"],
                       likelihood_steps=100 if FAST else 2000, progress=False)
MINE_COMMON["likelihood_steps"] = 0  # the residual or MLP critic, trained by eq. 19-20
MINE_Q = dict(MINE_COMMON, max_steps=20 if FAST else 1500, patience=5)
MINE_PRIOR = dict(MINE_COMMON, max_steps=20 if FAST else 1000, lr=3e-4, num_leapfrog=5, patience=10)

# The paper's linear-VAE10 column of Fig. 3a (its W was drawn differently: its true MI is 23.23 nats)
PAPER_LINEAR = {
    "BA": "22.69", f"GIWAE K={GIWAE_K[0]}": "22.87", f"GIWAE K={GIWAE_K[1]}": "22.69",
    f"InfoNCE K={GIWAE_K[0]}": "4.61", "MINE-AIS, base p(z)": "(23.15, 23.15)",
    f"AIS on IBAL of GIWAE K={GIWAE_K[0]}": "(22.87, 22.87)", f"AIS on IBAL of InfoNCE K={GIWAE_K[0]}": "(11.38, 11.39)",
    "AIS sandwich": "(23.23, 23.23)", f"IWAE K={IWAE_K}": "23.19",
} if not FAST else {}

# %% [markdown]
# ## The rows of Fig. 3a, for one model
#
# Every bound gets the same simulated pairs (x, z). Each call is timed with
# `time.perf_counter` (fitting q is timed separately: every row but InfoNCE starts from it).
# For the IBAL rows, `upper` is `ibal_upper`, the forward-chain upper bound on the IBAL:
# the convergence check, not a bound on the MI. `giwae_lower` is the GIWAE (K = 100)
# bound of the same (q, T), which needs no condition.


# %%
def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    r = fn(*args, **kwargs)
    return r, time.perf_counter() - t0


def fig3a_rows(name: str, seed: int = 0):
    pyro.set_rng_seed(seed)
    ex = get_example(name)
    density = ModelDensity(ex.model, ex.obs_sites)
    x, z = density.sample(NUM_DATA)  # the evaluation pairs, shared by every row
    q = GaussianEncoder(density)
    _, fit_s = timed(fit_guide, density, q, num_steps=FIT_STEPS, progress=False)
    print(f"== {name}: N = {NUM_DATA}, fit_guide {FIT_STEPS} steps: {fit_s:.1f} s")
    rows, results = [], {}

    def add(label, r, s, uses_likelihood=False):
        d = r.diagnostics
        ibal = "ibal_upper" in d
        # BA's own upper side reads p(x|z): a row that does not use the likelihood shows its lower only
        upper = d["ibal_upper"] if ibal else (r.upper if uses_likelihood else None)
        rows.append(dict(
            model=name, bound=label, likelihood="yes" if uses_likelihood else "no", lower=r.lower,
            upper=upper, upper_kind="ibal_upper" if ibal else ("mi" if upper is not None else ""),
            stderr=r.lower_stderr, giwae_lower=d.get("giwae_lower"), ba_term=d.get("ba_term"),
            steps=r.settings.get("steps"), best_step=getattr(d.get("training"), "best_step", None), seconds=s,
            warnings=list(r.warnings)))
        results[label] = r
        up = f", upper {rows[-1]['upper']:.3f} ({rows[-1]['upper_kind']})" if rows[-1]["upper"] is not None else ""
        st = (f", {rows[-1]['steps']} training steps (parameters kept: step {rows[-1]['best_step']})"
              if rows[-1]["steps"] is not None else "")
        if "proposal_trained" in r.settings:
            st += f", q trained: {r.settings['proposal_trained']}"
        print(f"{label:32s} lower {r.lower:.3f} ± {r.lower_stderr:.3f}{up}; {s:.1f} s{st}; warnings: {r.warnings}")

    pyro.set_rng_seed(seed + 1)
    add("BA", *timed(ba_bounds, density, q, x, z, progress=False))
    for K in GIWAE_K:
        pyro.set_rng_seed(seed + 2)
        add(f"GIWAE K={K}", *timed(giwae_bounds, density, q, x, z, num_particles=K, **GIWAE_TRAIN))
    K0 = GIWAE_K[0]
    pyro.set_rng_seed(seed + 3)
    add(f"InfoNCE K={K0}", *timed(infonce_bounds, density, q, x, z, num_particles=K0, **GIWAE_TRAIN))
    pyro.set_rng_seed(seed + 9)
    add("MINE-AIS, likelihood critic", *timed(mine_ais_bounds, density, q, x, z, **MINE_LIKELIHOOD))
    pyro.set_rng_seed(seed + 4)
    add("MINE-AIS, base q", *timed(mine_ais_bounds, density, q, x, z, **MINE_Q))
    pyro.set_rng_seed(seed + 5)
    add("MINE-AIS, base p(z)", *timed(mine_ais_bounds, density, PriorProposal(density), x, z, **MINE_PRIOR))
    for src, base in ((f"GIWAE K={K0}", None), (f"InfoNCE K={K0}", PriorProposal(density))):
        d = results[src].diagnostics
        pyro.set_rng_seed(seed + 6)
        add(f"AIS on IBAL of {src}", *timed(ibal_bounds, density, base or d["proposal"], x, z, num_chains=NUM_CHAINS,
                                             num_steps=EVAL_T, critic=d["critic"], progress=False))
    pyro.set_rng_seed(seed + 7)
    add("AIS sandwich", *timed(ais_bounds, density, q, x, z, num_chains=NUM_CHAINS, num_steps=SANDWICH_T,
                               progress=False), uses_likelihood=True)
    pyro.set_rng_seed(seed + 8)
    add(f"IWAE K={IWAE_K}", *timed(iwae_bounds, density, q, x, z, num_particles=IWAE_K, progress=False),
        uses_likelihood=True)
    print("note on the MINE-AIS lower:", results["MINE-AIS, base q"].notes[0])
    return dict(name=name, ex=ex, density=density, x=x, z=z, q=q, fit_seconds=fit_s, rows=rows, results=results)


def points_mi(run) -> float | None:
    """linear-vae only: the exact MI of the N simulated points, mean of log p(x|z) - log p(x)."""
    ex, density, x, z = run["ex"], run["density"], run["x"], run["z"]
    if ex.name != "linear-vae":
        return None
    W, b, s = ex.params["W"], ex.params["b"], float(ex.params["noise_scale"])
    cov = W @ W.T + s**2 * torch.eye(W.shape[0], dtype=W.dtype)
    log_px = torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x["x"])
    with torch.no_grad():
        return float((density.log_likelihood(x, z) - log_px).mean())


def print_table(run):
    paper = PAPER_LINEAR if run["name"] == "linear-vae" else {}
    print(f"\n### {run['name']} (N = {NUM_DATA}; fit_guide {run['fit_seconds']:.1f} s)\n")
    head = "| bound | uses p(x\\|z) | lower | upper | ± stderr | GIWAE K=100 of same (q, T) | steps (kept) | seconds |"
    sep = "|---|---|---|---|---|---|---|---|"
    if paper:
        head, sep = head + " paper (linear VAE10) |", sep + "---|"
    print(head + "\n" + sep)
    for r in run["rows"]:
        up = "" if r["upper"] is None else f"{r['upper']:.2f}" + (" (IBAL)" if r["upper_kind"] == "ibal_upper" else "")
        gl = "" if r["giwae_lower"] is None else f"{r['giwae_lower']:.2f}"
        steps = "" if r["steps"] is None else f"{r['steps']} ({r['best_step']})"
        line = (f"| {r['bound']} | {r['likelihood']} | {r['lower']:.2f} | {up} | {r['stderr']:.2f} | {gl} | "
                f"{steps} | {r['seconds']:.1f} |")
        print(line + (f" {paper.get(r['bound'], '')} |" if paper else ""))
    ex = run["ex"]
    if ex.true_mi is not None:
        tail = " 23.23 |" if paper else ""
        print(f"| analytic MI of the model | | {ex.true_mi:.2f} | | | | | |{tail}")
        print(f"| exact MI of these {NUM_DATA} points | | {points_mi(run):.2f} | | | | | |" + (" |" if paper else ""))


# %% [markdown]
# ## (a) linear-vae
#
# The true posterior is Gaussian, so BA with a well-fitted encoder is already close to the
# MI and there is little for a critic to add. Look at: whether MINE-AIS with base q rises
# above BA, whether its `lower` and IBAL upper agree (AIS converged), and how far the
# prior-based MINE-AIS, which has to learn the whole posterior in its critic, gets with
# our small budget. A lower bound compares with the exact MI *of these points* (last row)
# within its standard error; the model's MI differs from it by Monte-Carlo error.

# %%
runs = {}
runs["linear-vae"] = fig3a_rows("linear-vae")
print_table(runs["linear-vae"])

# %% [markdown]
# ## (b) digits-gan
#
# A GAN-like decoder: the posterior is far from Gaussian, BA is far below the AIS
# sandwich, and the critic has much to add. The sandwich (which uses p(x|z)) is the
# reference for the MI of these points.

# %%
runs["digits-gan"] = fig3a_rows("digits-gan")
print_table(runs["digits-gan"])

# %% [markdown]
# ## Fig. 7: the IBAL against the number of annealing steps
#
# For each trained MINE-AIS (q, T), `ibal_bounds` evaluates the IBAL at T annealing steps
# (fresh draws at every T, the largest T included: it repeats the table's evaluation with
# other random numbers, and times the evaluation alone). The reverse chains' `lower` rises
# and the forward chains' `ibal_upper` falls as T grows; where they meet is the IBAL of
# the learned (q, T). At T = 1 the lower is a GIWAE bound with K = num_chains of the same
# (q, T) (App. M.2); it is printed beside a direct GIWAE estimate with that K (equal in
# expectation, not draw for draw).

# %%
sweep = []
for name, run in runs.items():
    density, x, z = run["density"], run["x"], run["z"]
    for base in ("MINE-AIS, likelihood critic", "MINE-AIS, base q", "MINE-AIS, base p(z)"):
        trained = run["results"][base]
        q_t, critic = trained.diagnostics["proposal"], trained.diagnostics["critic"]
        L = trained.settings["num_leapfrog"]
        for T in SWEEP_T:
            pyro.set_rng_seed(100 + T)
            r, s = timed(ibal_bounds, density, q_t, x, z, num_chains=NUM_CHAINS, num_steps=T, num_leapfrog=L,
                         critic=critic, progress=False)
            extra = ""
            if T == 1:
                with torch.no_grad():
                    g_ba, g_con = giwae_terms(density, q_t, critic, x, z, NUM_CHAINS)
                extra = f"   (GIWAE K={NUM_CHAINS} of the same (q, T): {float((g_ba + g_con).mean()):.3f})"
            sweep.append(dict(model=name, base=base, T=T, lower=r.lower, ibal_upper=r.diagnostics["ibal_upper"],
                              stderr=r.lower_stderr, seconds=s, warnings=list(r.warnings)))
            print(f"{name:10s} {base:20s} T={T:5d}: lower {r.lower:7.3f} ± {r.lower_stderr:.3f}, "
                  f"ibal_upper {r.diagnostics['ibal_upper']:7.3f}; {s:6.1f} s;"
                  f" warnings: {r.warnings}{extra}")

# %%
with open(OUT / "06_mine_ais.csv", "w") as f:
    f.write("model,bound,uses_likelihood,lower,upper,upper_kind,stderr,giwae_lower,steps,best_step,seconds,"
            "num_warnings\n")
    for run in runs.values():
        for r in run["rows"]:
            f.write(",".join(str(v) for v in (
                r["model"], r["bound"], r["likelihood"], f"{r['lower']:.4f}",
                "" if r["upper"] is None else f"{r['upper']:.4f}", r["upper_kind"], f"{r['stderr']:.4f}",
                "" if r["giwae_lower"] is None else f"{r['giwae_lower']:.4f}", "" if r["steps"] is None else r["steps"],
                "" if r["best_step"] is None else r["best_step"], f"{r['seconds']:.1f}", len(r["warnings"]))) + "\n")
with open(OUT / "06_mine_ais_sweep.csv", "w") as f:
    f.write("model,base,T,lower,ibal_upper,stderr,seconds\n")
    for r in sweep:
        f.write(f"{r['model']},{r['base']},{r['T']},{r['lower']:.4f},{r['ibal_upper']:.4f},{r['stderr']:.4f},"
                f"{r['seconds']:.1f}\n")

BASES = (("MINE-AIS, base p(z)", "tab:blue"), ("MINE-AIS, base q", "tab:red"),
         ("MINE-AIS, likelihood critic", "tab:purple"))
fig, axes = plt.subplots(len(runs), len(BASES), figsize=(16, 3.8 * len(runs)), squeeze=False)
for row_axes, (name, run) in zip(axes, runs.items()):
    for ax, (base, color) in zip(row_axes, BASES):  # one panel per base: their scales differ
        sel = [r for r in sweep if r["model"] == name and r["base"] == base]
        Ts = [r["T"] for r in sel]
        ax.plot(Ts, [r["lower"] for r in sel], "o-", color=color, label="lower (reverse chains)")
        ax.plot(Ts, [r["ibal_upper"] for r in sel], "s--", color=color, label="IBAL upper (forward chains)")
        ais = run["results"]["AIS sandwich"]
        ax.axhspan(ais.lower, ais.upper, color="0.5", alpha=0.5, label=f"AIS sandwich, T = {SANDWICH_T} (uses p(x|z))")
        if run["ex"].true_mi is not None:
            ax.axhline(run["ex"].true_mi, color="k", lw=1, label="analytic MI")
        ax.axhline(run["results"]["BA"].lower, color="tab:green", lw=1, ls=":", label="BA (q)")
        ax.set_xscale("log")
        ax.set_xlabel("annealing steps T")
        ax.set_ylabel("nats")
        ax.set_title(f"{name}: {base}", fontsize=10)
        ax.legend(fontsize=7)
fig.tight_layout()
fig.savefig(OUT / "06_mine_ais.png", dpi=120)

# %% [markdown]
# What to look for: with base q both curves start near BA at T = 1 (the critic corrects a
# good Gaussian q) and close after a few steps; with base p(z) they start far apart (the
# prior is far from the posterior, so one forward chain of T = 1 is a poor estimate of
# log Z) and close only slowly: the gap at the largest T says how much of the row's
# number is AIS error rather than the learned critic. The reverse (lower) curve should
# stay below the forward one at every T; the results warn when it does not (Prop. M.1's
# condition fails).

# %%
print(f"total wall time {time.perf_counter() - T_START:.0f} s ({'FAST' if FAST else 'full'} mode)")
