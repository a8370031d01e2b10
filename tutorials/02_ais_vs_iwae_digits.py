# %% [markdown]
# # AIS against IWAE on the digits VAE
#
# How tight a sandwich on the generative mutual information I(x; z) of a small nonlinear
# VAE can you buy with a given number of CPU seconds? This tutorial compares the IWAE
# bounds (more importance samples K) with multi-sample AIS (more annealing steps T), as in
# Fig. 8 of Brekelmans et al. 2022, and then looks at the AIS chains with ArviZ.
#
# Set `PYRO_MI_TUTORIAL_FAST=1` to run a tiny version (used by the test suite).

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyro_mi.bounds import METHODS  # noqa: E402
from pyro_mi.density import ModelDensity  # noqa: E402
from pyro_mi.examples import get_example  # noqa: E402
from pyro_mi.proposal import GuideDensity  # noqa: E402

FAST = os.environ.get("PYRO_MI_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("PYRO_MI_TUTORIAL_OUTPUT", Path(__file__).resolve().parent / "output"))
OUT.mkdir(parents=True, exist_ok=True)
# One thread: these tensors are small, and on a shared or busy CPU two threads can be many
# times slower (OpenMP threads wait for each other at every op).
torch.set_num_threads(1)

NUM_DATA = 8 if FAST else 64
IWAE_K = [1, 10] if FAST else [1, 10, 100, 1000, 10000]
AIS_T = [2, 5] if FAST else [10, 30, 100, 300]
NUM_CHAINS = 4 if FAST else 16

# %% [markdown]
# The model: z ~ N(0, I_8), x | z ~ N(decoder(z), sigma^2 I_64), with the trained encoder
# shipped as the example's guide q(z|x). We simulate (x, z) pairs from the model: the
# simulated z is an exact posterior sample, which the upper bounds on log p(x) (the MI
# lower bounds) use.

# %%
ex = get_example("digits-vae")
density = ModelDensity(ex.model, ex.obs_sites)
proposal = GuideDensity(density, ex.guide)
pyro.set_rng_seed(0)
x, z = density.sample(NUM_DATA)

# %% [markdown]
# ## Bound against seconds

# %%
rows = []
for K in IWAE_K:
    pyro.set_rng_seed(1)
    t = time.perf_counter()
    r = METHODS["iwae"](density, proposal, x, z, num_particles=K, progress=False)
    rows.append(("iwae", K, 1, r.lower, r.upper, time.perf_counter() - t))
ais_results = {}
for T in AIS_T:
    pyro.set_rng_seed(1)
    t = time.perf_counter()
    # record=True keeps the chains for ArviZ (off by default, so that memory stays flat in T);
    # precondition="none": the chains start from the guide itself, the figure's poor proposal, as in
    # the paper (by default AIS first fits a Gaussian to each point's posterior and starts from that)
    r = METHODS["ais"](density, proposal, x, z, num_chains=NUM_CHAINS, num_steps=T, record=True,
                       precondition="none", progress=False)
    ais_results[T] = r
    rows.append(("ais", NUM_CHAINS, T, r.lower, r.upper, time.perf_counter() - t))

print(f"{'method':6} {'K':>6} {'T':>5} {'lower':>9} {'upper':>9} {'gap':>8} {'seconds':>8}")
for m, K, T, lo, up, s in rows:
    print(f"{m:6} {K:6d} {T:5d} {lo:9.3f} {up:9.3f} {up - lo:8.3f} {s:8.2f}")
with open(OUT / "02_ais_vs_iwae_digits.csv", "w") as f:
    f.write("method,K,T,lower,upper,seconds\n")
    for row in rows:
        f.write(",".join(str(v) for v in row) + "\n")

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for m, color in (("iwae", "tab:blue"), ("ais", "tab:red")):
    sel = [r for r in rows if r[0] == m]
    secs = [r[5] for r in sel]
    ax.plot(secs, [r[3] for r in sel], "o-", color=color, label=f"{m.upper()} lower")
    ax.plot(secs, [r[4] for r in sel], "s--", color=color, label=f"{m.upper()} upper")
ax.set_xscale("log")
ax.set_xlabel("seconds")
ax.set_ylabel("I(x; z) bound (nats)")
ax.set_title("digits VAE: bound against compute")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "02_ais_vs_iwae_digits.png", dpi=120)

# %% [markdown]
# IWAE's gap closes only logarithmically in K, while AIS closes it roughly linearly in T
# (Prop. 3.1): for the same seconds, AIS gives the much tighter sandwich.
#
# ## The chains, in ArviZ
#
# `result.to_arviz()` returns an InferenceData: `posterior` holds draws of p(z | x_i) only,
# the forward chains' HMC transitions at beta = 1 after their annealing (chain, draw, data,
# z_dim_0), so that r-hat and ESS across chains mean what they mean for MCMC; `sample_stats`
# those transitions' acceptance, step size and divergences; `annealing` and
# `annealing_stats` the path itself (states and per-step statistics, with a beta coordinate).
# `tutorials/08_diagnostics.py` reads them on a loose sandwich.

# %%
best = ais_results[AIS_T[-1]]
idata = best.to_arviz()
print(idata)
print("mean acceptance", best.diagnostics["accept_rate"], "divergences", best.diagnostics["divergences"])
print("ESS of the final importance weights (of", NUM_CHAINS, "chains):", best.diagnostics["ess"])
print(az.summary(idata.sample_stats, var_names=["accept_prob", "step_size"], coords={"data": [0]}, kind="stats", skipna=True))
print(az.summary(idata.posterior, coords={"data": [0]}, kind="diagnostics"))
az.plot_trace(idata, var_names=["z"], coords={"data": [0], "z_dim_0": [0, 1]})
plt.savefig(OUT / "02_ais_chains_trace.png", dpi=100)
