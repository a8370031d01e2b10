"""Cost per SVI step of pyro_mi's MI-aware losses against ``Trace_ELBO`` on Pyro's own VAE.

The model and guide are those of Pyro's ``examples/vae/vae.py`` as the zoo rewrites them
(:class:`pyro_mi.examples.zoo.VAE`: a Bernoulli likelihood observed as ``obs=x.reshape(-1, 784)``,
both methods of a class; the last two rows swap in a Normal likelihood of scale 0.1, which symmetric
``Trace_MIM`` can sample), with z in R^10, hidden 100, on the 8x8
digits upsampled to 28 x 28 (pixels / 16, bilinear), batch 128, Adam 1e-3. Each loss takes
``--steps`` SVI steps from the same initial parameters, interleaved over ``--repeats`` rounds; the
best milliseconds per step are printed with the ratio to ``Trace_ELBO`` measured in this process.
``--accuracy-steps S`` also fits each critic setting S steps on one fixed VAE, from
``--accuracy-seeds`` initialisations, and prints the MI bound it reaches (see :func:`accuracy`): what
fewer negatives and a smaller critic cost in accuracy per SVI step.

    OMP_NUM_THREADS=1 python benchmarks/mi_losses_cost.py [--steps 30] [--repeats 3] [--batch 128]
        [--accuracy-steps 1500] [--accuracy-seeds 3]
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

from pyro_mi import Trace_MIM, TraceMI_ELBO
from pyro_mi.infer.mi_elbo import DEFAULT_CRITIC_HIDDEN, xi_bound
from pyro_mi.critics import JointCritic, SeparableCritic
from pyro_mi.examples.digits_vae import load_digits_28
from pyro_mi.examples.zoo import VAE


class NormalVAE(VAE):
    """The same VAE with a Normal likelihood of scale 0.1, which symmetric Trace_MIM can sample."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("latent", dist.Normal(x.new_zeros(x.shape[0], self.z_dim), 1.0).to_event(1))
            pyro.sample("obs", dist.Normal(self.decoder(z), 0.1).to_event(1), obs=x.reshape(-1, 784))


def accuracy(data, base, num_steps: int, num_seeds: int, batch: int) -> None:
    """MI accuracy per step, the SVI view (each SVI step takes one critic step): on one VAE trained
    by Trace_ELBO (500 steps, fixed afterwards), each critic setting of TraceMI_ELBO ascends its
    training bound (the critic's gradient of the loss) for ``num_steps`` steps on fresh batches of
    (x, z ~ q(z|x)), from ``num_seeds`` initialisations; printed is the ξ-bound it reaches on 8
    held-out batches with all mismatched pairs (higher is tighter: all are lower bounds on the
    encoder's I(x; z)), its mean and range over seeds, and the critic's seconds per step. Seeded
    here, so its numbers do not depend on what the timings drew."""
    torch.manual_seed(0)
    pyro.clear_param_store()
    vae = copy.deepcopy(base)
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), Trace_ELBO())
    g = torch.Generator().manual_seed(1)
    for _ in range(500):
        svi.step(data[torch.randint(len(data), (batch,), generator=g)])

    def pairs(x):
        with torch.no_grad():
            z = dist.Normal(*vae.encoder(x)).sample()
        return x.reshape(-1, 784), z

    g = torch.Generator().manual_seed(2)
    held = [pairs(data[torch.randint(len(data), (batch,), generator=g)]) for _ in range(8)]
    print(f"\ncritic fits of {num_steps} steps from {num_seeds} seeds on one Trace_ELBO-trained VAE; held-out: 8 "
          f"batches of {batch}, all pairs\n")
    print("| critic | num_negatives | I_xi bound, mean over seeds (nats) | min | max | critic ms per step |")
    print("|---|---|---|---|---|---|")
    settings = [(f"JointCritic(784, 10, {DEFAULT_CRITIC_HIDDEN}) (TraceMI_ELBO's default)",
                 lambda: JointCritic(784, 10, DEFAULT_CRITIC_HIDDEN), 4),
                ("JointCritic(784, 10)", lambda: JointCritic(784, 10), 4),
                ("JointCritic(784, 10)", lambda: JointCritic(784, 10), 16),
                ("SeparableCritic(784, 10)", lambda: SeparableCritic(784, 10), None)]
    for label, make, k in settings:
        values, seconds = [], 0.0
        for seed in range(num_seeds):
            torch.manual_seed(3 + seed)
            critic = make()
            opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
            for _ in range(num_steps):
                x, z = pairs(data[torch.randint(len(data), (batch,))])
                start = time.perf_counter()
                loss = -xi_bound(critic, x, z, 1.0, k)
                opt.zero_grad()
                loss.backward()
                opt.step()
                seconds += time.perf_counter() - start
            with torch.no_grad():
                values.append(sum(float(xi_bound(critic, x, z)) for x, z in held) / len(held))
        mean = sum(values) / len(values)
        print(f"| {label} | {k} | {mean:.3f} | {min(values):.3f} | {max(values):.3f} | "
              f"{seconds / (num_steps * num_seeds) * 1e3:.1f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--accuracy-seeds", type=int, default=3)
    ap.add_argument("--accuracy-steps", type=int, default=0,
                    help="also fit each critic setting this many steps on a fixed VAE and print the MI bound it reaches")
    args = ap.parse_args()
    torch.manual_seed(0)
    data = load_digits_28()
    base = VAE(z_dim=10, hidden_dim=100)
    losses = {
        "Trace_ELBO": lambda: Trace_ELBO(),
        "Trace_MIM(asymmetric=True)": lambda: Trace_MIM(asymmetric=True),
        "Trace_MIM()": lambda: Trace_MIM(),
        "TraceMI_ELBO() (default critic)": lambda: TraceMI_ELBO(),
        "TraceMI_ELBO(mi_weight=0)": lambda: TraceMI_ELBO(mi_weight=0.0),
        "TraceMI_ELBO(JointCritic(784, 10), mi_weight=1)": lambda: TraceMI_ELBO(JointCritic(784, 10), mi_weight=1.0),
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
            if name.endswith("Normal likelihood"):
                vae.__class__ = NormalVAE
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
    if args.accuracy_steps:
        accuracy(data, base, args.accuracy_steps, args.accuracy_seeds, args.batch)


if __name__ == "__main__":
    main()
