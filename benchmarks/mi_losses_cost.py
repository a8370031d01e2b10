"""Cost per SVI step of pyro_mi's MI-aware losses against ``Trace_ELBO`` on Pyro's own VAE.

The model and guide are those of Pyro's ``examples/vae/vae.py`` (rewritten here: an encoder and a
decoder of one softplus hidden layer, z ~ N(0, I), a Bernoulli likelihood observed as
``obs=x.reshape(-1, 784)``, both methods of a class; the last two rows swap in a Normal likelihood of
scale 0.1, which symmetric ``Trace_MIM`` can sample), with z in R^10, hidden 100, on the 8x8
digits upsampled to 28 x 28 (pixels / 16, bilinear), batch 128, Adam 1e-3. Each loss takes
``--steps`` SVI steps from the same initial parameters, interleaved over ``--repeats`` rounds; the
best milliseconds per step are printed with the ratio to ``Trace_ELBO`` measured in this process.
``--accuracy-seconds S`` also fits each critic setting for S seconds on one fixed VAE and prints the
MI bound it reaches (see :func:`accuracy`): the price of fewer negatives at equal time.

    OMP_NUM_THREADS=1 python benchmarks/mi_losses_cost.py [--steps 30] [--repeats 3] [--batch 128]
        [--accuracy-seconds 20]
"""

from __future__ import annotations

import argparse
import copy
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from sklearn.datasets import load_digits
from torch import nn

from pyro_mi import Trace_MIM, TraceMI_ELBO
from pyro_mi.infer.mi_elbo import xi_bound
from pyro_mi.critics import JointCritic, SeparableCritic


class VAE(nn.Module):
    """Pyro's examples/vae/vae.py VAE, as its authors wrote it (rewritten)."""

    def __init__(self, z_dim: int = 10, hidden_dim: int = 100, likelihood: str = "bernoulli"):
        super().__init__()
        self.likelihood = likelihood  # "normal": N(loc_img, 0.1), which symmetric Trace_MIM can sample
        self.fc1, self.fc21, self.fc22 = nn.Linear(784, hidden_dim), nn.Linear(hidden_dim, z_dim), nn.Linear(hidden_dim, z_dim)
        self.fc3, self.fc4 = nn.Linear(z_dim, hidden_dim), nn.Linear(hidden_dim, 784)
        self.softplus, self.z_dim = nn.Softplus(), z_dim

    def model(self, x):
        pyro.module("decoder", self)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, torch.ones_like(z_loc)).to_event(1))
            loc_img = torch.sigmoid(self.fc4(self.softplus(self.fc3(z))))
            if self.likelihood == "bernoulli":
                pyro.sample("obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784))
            else:
                pyro.sample("obs", dist.Normal(loc_img, 0.1).to_event(1), obs=x.reshape(-1, 784))

    def guide(self, x):
        pyro.module("encoder", self)
        with pyro.plate("data", x.shape[0]):
            hidden = self.softplus(self.fc1(x.reshape(-1, 784)))
            pyro.sample("latent", dist.Normal(self.fc21(hidden), torch.exp(self.fc22(hidden))).to_event(1))


def digits_28() -> torch.Tensor:
    """The 1797 digits, 8 x 8 upsampled to 28 x 28, in [0, 1]: (1797, 1, 28, 28)."""
    x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    return nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)


def accuracy(data, base, seconds: float, batch: int) -> None:
    """MI accuracy at equal time: on one VAE trained by Trace_ELBO (500 steps, fixed afterwards),
    each critic setting of TraceMI_ELBO ascends its training bound (the critic's gradient of the
    loss) for ``seconds`` of wall time on fresh batches of (x, z ~ q(z|x)); printed is the ξ-bound
    it reaches on 8 held-out batches with all mismatched pairs (higher is tighter: all are lower
    bounds on the encoder's I(x; z))."""
    pyro.clear_param_store()
    vae = copy.deepcopy(base)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    g = torch.Generator().manual_seed(1)
    for _ in range(500):
        svi.step(data[torch.randint(len(data), (batch,), generator=g)])

    def pairs(x):
        with torch.no_grad():
            h = vae.softplus(vae.fc1(x.reshape(-1, 784)))
            z = dist.Normal(vae.fc21(h), torch.exp(vae.fc22(h))).sample()
        return x.reshape(-1, 784), z

    g = torch.Generator().manual_seed(2)
    held = [pairs(data[torch.randint(len(data), (batch,), generator=g)]) for _ in range(8)]
    print(f"\ncritic fits at equal time ({seconds:g} s each) on one Trace_ELBO-trained VAE; held-out: 8 batches "
          f"of {batch}, all pairs\n")
    print("| critic | num_negatives | steps | I_xi bound (nats) |")
    print("|---|---|---|---|")
    for critic_cls in (JointCritic, SeparableCritic):
        for k in (4, 16, 64, None):
            torch.manual_seed(3)
            critic = critic_cls(784, 10)
            opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
            steps, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                x, z = pairs(data[torch.randint(len(data), (batch,))])
                loss = -xi_bound(critic, x, z, 1.0, k)
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            with torch.no_grad():
                mi = sum(float(xi_bound(critic, x, z)) for x, z in held) / len(held)
            print(f"| {critic_cls.__name__}(784, 10) | {k} | {steps} | {mi:.3f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--accuracy-seconds", type=float, default=0,
                    help="also fit each critic setting this long on a fixed VAE and print the MI bound it reaches")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = digits_28()
    base = VAE()
    losses = {
        "Trace_ELBO": lambda: Trace_ELBO(),
        "Trace_MIM(asymmetric=True)": lambda: Trace_MIM(asymmetric=True),
        "TraceMI_ELBO(JointCritic(784, 10), mi_weight=1)": lambda: TraceMI_ELBO(JointCritic(784, 10), mi_weight=1.0),
        "TraceMI_ELBO(JointCritic(784, 10), mi_weight=0)": lambda: TraceMI_ELBO(JointCritic(784, 10), mi_weight=0.0),
        **{f"TraceMI_ELBO(JointCritic(784, 10), num_negatives={k})":
           (lambda k=k: TraceMI_ELBO(JointCritic(784, 10), mi_weight=1.0, num_negatives=k)) for k in (16, None)},
        "TraceMI_ELBO(SeparableCritic(784, 10), num_negatives=None)":
            lambda: TraceMI_ELBO(SeparableCritic(784, 10), mi_weight=1.0, num_negatives=None),
        "Trace_ELBO, Normal likelihood": lambda: Trace_ELBO(),
        "Trace_MIM(), Normal likelihood": lambda: Trace_MIM(),
    }
    best = {name: float("inf") for name in losses}
    for _ in range(args.repeats):
        for name, make in losses.items():
            pyro.clear_param_store()
            vae = copy.deepcopy(base)
            vae.likelihood = "normal" if name.endswith("Normal likelihood") else "bernoulli"
            svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), make())
            g = torch.Generator().manual_seed(1)
            batches = [data[torch.randint(len(data), (args.batch,), generator=g)] for _ in range(args.steps + 2)]
            for x in batches[:2]:  # warm-up (first-call costs)
                svi.step(x)
            start = time.perf_counter()
            for x in batches[2:]:
                svi.step(x)
            best[name] = min(best[name], (time.perf_counter() - start) / args.steps * 1e3)
    print(f"Pyro's VAE (z in R^10, hidden 100, 28 x 28 digits), batch {args.batch}, "
          f"{torch.get_num_threads()} thread(s), best of {args.repeats} x {args.steps} steps\n")
    print("| loss | ms per step | x Trace_ELBO |")
    print("|---|---|---|")
    for name, ms in best.items():
        print(f"| `{name}` | {ms:.1f} | {ms / best['Trace_ELBO']:.2f} |")
    if args.accuracy_seconds:
        accuracy(data, base, args.accuracy_seconds, args.batch)


if __name__ == "__main__":
    main()
