"""Train the ``digits-gan`` example and write ``pyro_mi/examples/digits_gan.pt``.

From fixed seeds, on scikit-learn's 8x8 digits (1797 images, pixels / 16), fit
the :class:`pyro_mi.examples.digits_gan.Generator` (10 -> 256 ReLU -> 64
sigmoid) as a Wasserstein GAN with gradient penalty (Gulrajani et al., 2017,
Alg. 1): a critic MLP 64 -> 256 -> 256 -> 1 (LeakyReLU 0.2), ``--critic-steps``
critic updates per generator update, penalty weight ``--gp-weight`` on
(|grad D(x_hat)| - 1)^2 at random interpolates, Adam (lr 1e-4, betas (0.5, 0.9))
for both networks, as in Brekelmans et al. (2022), App. O.1.1 (GP, Adam lr 1e-4,
best checkpoint kept).  The fake samples are the generator's sigmoid means; the
example adds the fixed N(0, 0.1^2) observation noise only at evaluation.

The digits are split once (seeded) into train / validation / test sets.  Every
``--eval-every`` generator steps the script prints the unbiased Gaussian-kernel
MMD^2 (:func:`pyro_mi.examples.digits_gan.mmd2`, bandwidths 1, 2, 4 pixels)
between the means of a fixed batch of generated digits and the validation
digits, and keeps the generator with the smallest value.  At the end it scores
that checkpoint on the test digits with fresh latent draws, next to references:
a real-vs-real floor (training digits), a randomly initialised generator, and
the ``digits-vae`` decoder (means and noisy samples).

Only the generator's state_dict and a small metadata dict are saved (about 80 KiB).
Takes about 4 minutes (235-262 s) on one thread of a 2-core machine; bitwise reproducible.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/train_digits_gan.py [--steps 12000] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from pyro_mi.examples import get_example
    from pyro_mi.examples.digits_gan import DEFAULTS, MMD_BANDWIDTHS, Generator, load_digits_data, mmd2
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(REPO_ROOT))
    from pyro_mi.examples import get_example
    from pyro_mi.examples.digits_gan import DEFAULTS, MMD_BANDWIDTHS, Generator, load_digits_data, mmd2

DEFAULT_OUT = REPO_ROOT / "pyro_mi" / "examples" / "digits_gan.pt"


def make_critic(obs_dim: int = 64, hidden_dim: int = 256) -> nn.Module:
    """The WGAN critic D: R^obs_dim -> R, an MLP with two LeakyReLU(0.2) hidden layers."""
    return nn.Sequential(
        nn.Linear(obs_dim, hidden_dim), nn.LeakyReLU(0.2),
        nn.Linear(hidden_dim, hidden_dim), nn.LeakyReLU(0.2),
        nn.Linear(hidden_dim, 1),
    )


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Mean of (|grad_x D(x_hat)|_2 - 1)^2 over random interpolates x_hat of real and fake (N, d) rows."""
    eps = torch.rand(real.shape[0], 1)
    x_hat = (eps * real + (1.0 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
    return ((grad.norm(dim=1) - 1.0) ** 2).mean()


def split_digits(data: torch.Tensor, num_val: int, num_test: int, seed: int):
    """Seeded random split of the rows of ``data`` into (train, val, test)."""
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    val, test, train = perm[:num_val], perm[num_val: num_val + num_test], perm[num_val + num_test:]
    return data[train], data[val], data[test]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train, select, evaluate and save the checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12000, help="generator steps")
    parser.add_argument("--critic-steps", type=int, default=5, help="critic steps per generator step")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gp-weight", type=float, default=10.0)
    parser.add_argument("--critic-hidden", type=int, default=256)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-test", type=int, default=200)
    parser.add_argument("--num-eval", type=int, default=1000, help="generated digits per MMD evaluation")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for these tiny layers)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    data = load_digits_data()
    train, val, test = split_digits(data, args.num_val, args.num_test, args.seed)
    n = train.shape[0]
    gen_net = Generator(**DEFAULTS)
    init_state = copy.deepcopy(gen_net.state_dict())
    critic = make_critic(DEFAULTS["obs_dim"], args.critic_hidden)
    betas = (0.5, 0.9)
    opt_g = torch.optim.Adam(gen_net.parameters(), lr=args.lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=args.lr, betas=betas)
    latent_dim = DEFAULTS["latent_dim"]
    z_eval = torch.randn(args.num_eval, latent_dim, generator=torch.Generator().manual_seed(args.seed + 1))
    batches = torch.Generator().manual_seed(args.seed + 2)
    perm, pos = torch.randperm(n, generator=batches), 0

    def next_real() -> torch.Tensor:
        nonlocal perm, pos
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=batches), 0
        batch = train[perm[pos: pos + args.batch_size]]
        pos += args.batch_size
        return batch

    def val_score() -> float:
        with torch.no_grad():
            return mmd2(gen_net(z_eval), val)

    best = {"mmd2": val_score(), "step": 0, "state": copy.deepcopy(gen_net.state_dict())}
    print(f"step     0  val MMD^2 {best['mmd2']:.5f}  (random init)", flush=True)
    w_dist = gp = 0.0
    for step in range(1, args.steps + 1):
        for _ in range(args.critic_steps):
            real = next_real()
            with torch.no_grad():
                fake = gen_net(torch.randn(args.batch_size, latent_dim))
            w = critic(real).mean() - critic(fake).mean()
            penalty = gradient_penalty(critic, real, fake)
            opt_d.zero_grad(set_to_none=True)
            (-w + args.gp_weight * penalty).backward()
            opt_d.step()
        w_dist, gp = float(w.detach()), float(penalty.detach())
        opt_g.zero_grad(set_to_none=True)
        (-critic(gen_net(torch.randn(args.batch_size, latent_dim))).mean()).backward()
        opt_g.step()
        if step % args.eval_every == 0:
            score = val_score()
            mark = ""
            if score < best["mmd2"]:
                best = {"mmd2": score, "step": step, "state": copy.deepcopy(gen_net.state_dict())}
                mark = "  *best"
            print(
                f"step {step:5d}  val MMD^2 {score:.5f}  critic W-dist {w_dist:7.4f}  GP {gp:.4f}  "
                f"{time.perf_counter() - start:6.1f}s{mark}",
                flush=True,
            )
    train_time = time.perf_counter() - start

    # Final, honest scores on the untouched test digits with fresh latent draws.
    gen_net.load_state_dict(best["state"])
    gen_net.eval().requires_grad_(False)
    fresh = torch.Generator().manual_seed(args.seed + 3)
    with torch.no_grad():
        gan_means = gen_net.sample_means(args.num_eval, generator=fresh)
        gan_samples = gan_means + DEFAULTS["obs_scale"] * torch.randn(gan_means.shape, generator=fresh)
        test_mmd = mmd2(gan_means, test)
        refs = {
            "GAN best (means)": test_mmd,
            "GAN best (x samples, noise 0.1)": mmd2(gan_samples, test),
            "real train digits (floor)": mmd2(train[: args.num_eval], test),
        }
        rand_gen = Generator(**DEFAULTS)
        rand_gen.load_state_dict(init_state)
        refs["random-init generator (means)"] = mmd2(rand_gen.sample_means(args.num_eval, generator=fresh), test)
        vae = get_example("digits-vae").params["vae"]
        z = torch.randn(args.num_eval, vae.hparams["latent_dim"], generator=fresh)
        vae_means = vae.decoder(z)
        vae_samples = vae_means + vae.decoder.obs_scale() * torch.randn(vae_means.shape, generator=fresh)
        refs["digits-vae decoder (means)"] = mmd2(vae_means, test)
        refs["digits-vae decoder (x samples)"] = mmd2(vae_samples, test)
    print(f"best val MMD^2 {best['mmd2']:.5f} at step {best['step']}; trained in {train_time:.1f}s")
    print(f"test MMD^2 (bandwidths {MMD_BANDWIDTHS}, {args.num_eval} generated vs {test.shape[0]} test digits):")
    for label, value in refs.items():
        print(f"  {label:34s} {value:.5f}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "hparams": dict(gen_net.hparams),
            "state_dict": {k: v.detach().clone() for k, v in best["state"].items()},
            "train": {
                "method": "WGAN-GP", "steps": args.steps, "critic_steps": args.critic_steps,
                "batch_size": args.batch_size, "lr": args.lr, "betas": list(betas),
                "gp_weight": args.gp_weight, "critic_hidden": args.critic_hidden, "seed": args.seed,
                "num_train": n, "num_val": args.num_val, "num_test": args.num_test,
                "best_step": best["step"], "val_mmd2": best["mmd2"], "test_mmd2": test_mmd,
                "mmd_bandwidths": list(MMD_BANDWIDTHS), "train_seconds": round(train_time, 1),
            },
        },
        args.out,
    )
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
