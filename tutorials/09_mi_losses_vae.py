# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # What an MI-aware loss buys: Pyro's VAE trained three ways, its MI measured by AIS
#
# The Mutual Information Machine (Livne et al. 2019) and the VAE-MINE bonus claim models whose
# latents carry more information about the data than the ELBO's, without posterior collapse.
# Here Pyro's own VAE (`examples/vae/vae.py`, as the zoo rewrites it: z in R^10, hidden 100,
# Bernoulli pixels observed as `obs=x.reshape(-1, 784)`, model and guide methods of a class)
# trains on scikit-learn's digits upsampled to 28 x 28 with three losses, the only change being
# `loss=`:
#
# * `Trace_ELBO()`;
# * `pyro_mi.Trace_MIM()` (MIM, eq. 8: its decoding half samples Bernoulli pixels, whose gradient
#   takes a score-function term, REINFORCE as in the paper's App. D.2) and
#   `pyro_mi.Trace_MIM(asymmetric=True)` (A-MIM, eq. 12: encoding samples only, all pathwise);
# * `pyro_mi.TraceMI_ELBO(JointCritic(784, 10), mi_weight=1)` (the ELBO minus a critic's
#   ξ-bound on the encoder's I(x; z)).
#
# For each trained model the table gives the model's generative MI I(x; z) by pyro_mi's AIS
# sandwich (simulated points, the trained guide as π0), the ELBO and an IWAE estimate of the
# log-likelihood of held-out digits (a lower bound, nats per digit), and the reconstruction
# error of held-out digits through the encoder's mean.

# %%
import os
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer import SVI, Trace_ELBO  # noqa: E402
from pyro.optim import Adam  # noqa: E402

import pyro_mi  # noqa: E402
from pyro_mi.critics import JointCritic  # noqa: E402
from pyro_mi.examples.digits_vae import load_digits_28  # noqa: E402
from pyro_mi.examples.zoo import VAE  # noqa: E402
from pyro_mi.weights import log_mean_exp  # noqa: E402

FAST = os.environ.get("PYRO_MI_TUTORIAL_FAST") == "1"
OUT = Path(os.environ.get("PYRO_MI_TUTORIAL_OUTPUT", Path(__file__).resolve().parent / "output"))
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)
STEPS = 60 if FAST else 3000  # SVI steps of batch 128 (3000: about 270 epochs of the 1437 training digits)
NUM_DATA, NUM_STEPS = (32, 50) if FAST else (256, 1000)  # AIS: simulated points, annealing steps
HELD_K = 10 if FAST else 200  # IWAE samples per held-out digit

data = load_digits_28()
g = torch.Generator().manual_seed(0)
order = torch.randperm(len(data), generator=g)
train, held = data[order[:1437]], data[order[1437:]]

LOSSES = {
    "Trace_ELBO": lambda: Trace_ELBO(),
    "Trace_MIM()": lambda: pyro_mi.Trace_MIM(),
    "Trace_MIM(asymmetric=True)": lambda: pyro_mi.Trace_MIM(asymmetric=True),
    "TraceMI_ELBO(JointCritic, mi_weight=1)": lambda: pyro_mi.TraceMI_ELBO(JointCritic(784, 10), mi_weight=1.0),
}


def held_out_log_likelihood(vae: VAE, x: torch.Tensor, K: int) -> float:
    """IWAE with K guide samples per digit: mean over digits of log (1/K) Σ p(x, z_k) / q(z_k|x), nats."""
    log_w = []
    with torch.no_grad():
        for _ in range(K):
            guide = poutine.trace(vae.guide).get_trace(x)
            model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
            lw = sum(s["fn"].log_prob(s["value"]) for s in model.nodes.values() if s["type"] == "sample")
            lw = lw - guide.nodes["latent"]["fn"].log_prob(guide.nodes["latent"]["value"])
            log_w.append(lw)
    return float(log_mean_exp(torch.stack(log_w), 0).mean())


# %% [markdown]
# ## Training
# Each loss trains a copy of the same initial VAE on the same minibatches.

# %%
torch.manual_seed(0)
init = VAE(z_dim=10, hidden_dim=100)
rows = []
for name, make in LOSSES.items():
    pyro.clear_param_store()
    vae = VAE(z_dim=10, hidden_dim=100)
    vae.load_state_dict(init.state_dict())
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make())
    batches = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for _ in range(STEPS):
        svi.step(train[torch.randint(len(train), (128,), generator=batches)])
    seconds = time.perf_counter() - start
    torch.manual_seed(2)
    elbo = -Trace_ELBO(num_particles=10).loss(vae.model, vae.guide, held) / len(held)
    held_ll = held_out_log_likelihood(vae, held, HELD_K)
    with torch.no_grad():
        mse = float(((vae.decoder(vae.encoder(held)[0]) - held) ** 2).mean())
    # %% [markdown]
    # The model's MI by the AIS sandwich: simulated points of the trained model (its data plate
    # sized by the argument, as Pyro's VAE is called), the trained guide as π0.
    # %%
    mi = pyro_mi.estimate_mi(vae.model, "obs", model_args=(torch.zeros(128, 784),), guide=vae.guide, method="ais",
                             num_data=NUM_DATA, num_steps=NUM_STEPS, seed=0, progress=False)
    rows.append(dict(loss=name, seconds=seconds, lower=mi.lower, upper=mi.upper, warnings=mi.warnings,
                     elbo=elbo, held_ll=held_ll, mse=mse))
    print(f"{name}: trained in {seconds:.1f} s; MI [{mi.lower:.2f}, {mi.upper:.2f}]; held-out ELBO {elbo:.1f}, "
          f"IWAE {held_ll:.1f}, MSE {mse:.4f}", flush=True)
    for w in mi.warnings:
        print("   warning:", w[:200])

# %% [markdown]
# ## The table and the figure

# %%
lines = [f"Pyro's VAE (z in R^10, hidden 100), {STEPS} SVI steps of batch 128 on the 28 x 28 digits; MI by AIS "
         f"(N = {NUM_DATA}, T = {NUM_STEPS}, the trained guide as pi0); held-out: {len(held)} digits, IWAE with "
         f"K = {HELD_K}", "",
         "| loss | train s | MI lower | MI upper | warnings | held-out ELBO | held-out IWAE | reconstruction MSE |",
         "|---|---|---|---|---|---|---|---|"]
for r in rows:
    lines.append(f"| `{r['loss']}` | {r['seconds']:.1f} | {r['lower']:.2f} | {r['upper']:.2f} | {len(r['warnings'])} | "
                 f"{r['elbo']:.1f} | {r['held_ll']:.1f} | {r['mse']:.4f} |")
lines += ["", "Warnings of the MI sandwiches (a number with a warning may be loose or useless; the warning says why):"]
lines += [f"* `{r['loss']}`: {w}" for r in rows for w in r["warnings"]] or ["* none"]
report = "\n".join(lines)
print(report)
(OUT / "09_report.txt").write_text(report + "\n")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
names = [r["loss"].replace("(JointCritic, mi_weight=1)", "").replace("asymmetric=True", "A") for r in rows]
top = 1.15 * max(r["upper"] for r in rows)
for i, r in enumerate(rows):  # an MI is at least 0: a lower side below it is drawn from 0 and labelled
    axes[0].plot([i, i], [max(r["lower"], 0.0), r["upper"]], lw=8, color="C0", solid_capstyle="butt")
    axes[0].plot([i, i], [max(r["lower"], 0.0), r["upper"]], "_", ms=24, mew=2, color="C3")  # the sides
    axes[0].annotate(f"[{r['lower']:.4g}, {r['upper']:.4g}]", (i, r["upper"]), textcoords="offset points",
                     xytext=(0, 4), ha="center", fontsize=8)
axes[0].set_ylim(0, top)
axes[0].set_xlim(-0.5, len(rows) - 0.5)
axes[0].set_xticks(range(len(rows)), names)
axes[0].set_ylabel("I(x; z) of the trained model (nats)")
axes[0].set_title("the AIS sandwich of each model's MI")
axes[1].plot(range(len(rows)), [r["held_ll"] for r in rows], "o", color="C1", label="IWAE")
axes[1].plot(range(len(rows)), [r["elbo"] for r in rows], "s", color="C2", label="ELBO")
axes[1].set_xticks(range(len(rows)), names)
axes[1].set_xlim(-0.5, len(rows) - 0.5)
axes[1].set_ylabel("held-out nats per digit")
axes[1].set_title("what it costs in likelihood")
axes[1].legend()
fig.tight_layout()
fig.savefig(OUT / "09_mi_losses.png", dpi=100)
print("wrote", OUT / "09_mi_losses.png")
