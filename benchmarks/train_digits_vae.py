"""Train the ``digits-vae`` example and write ``pyro_mi/examples/digits_vae.pt``.

From a fixed seed, on scikit-learn's 8x8 digits (1797 images, pixels / 16), fit
:class:`pyro_mi.examples.digits_vae.DigitsVAE` (decoder and encoder) with
``pyro.infer.SVI``, ``Trace_ELBO`` and Adam on shuffled mini-batches; prints the
ELBO per data point (nats). The encoder is the VAE's own guide, trained on real
digits only: pyro_mi fits its own proposal on simulated pairs when it measures
the model's MI (see tutorials/01_digits_vae_ba_iwae.py for why that matters).

Takes about 70 s of CPU time on one thread (2.5 min wall on a busy 2-core machine).

Usage::

    python benchmarks/train_digits_vae.py [--steps 20000] [--out PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    from pyro_mi.examples.digits_vae import DEFAULTS, DigitsVAE, load_digits_data
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(REPO_ROOT))
    from pyro_mi.examples.digits_vae import DEFAULTS, DigitsVAE, load_digits_data

DEFAULT_OUT = REPO_ROOT / "pyro_mi" / "examples" / "digits_vae.pt"


def full_elbo(vae: DigitsVAE, data: torch.Tensor, num_particles: int = 16) -> float:
    """Monte-Carlo ELBO per data point (nats) on all of ``data`` (N, 64)."""
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    with torch.no_grad():
        return -elbo.loss(vae.model, vae.guide, data) / data.shape[0]


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, train, evaluate and save the checkpoint."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 is fastest for these tiny layers)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    data = load_digits_data()
    n = data.shape[0]
    vae = DigitsVAE(**DEFAULTS)
    # lr decays by 10x over the run (lrd is the per-step factor)
    optim = ClippedAdam({"lr": args.lr, "lrd": 0.1 ** (1.0 / args.steps)})
    svi = SVI(vae.model, vae.guide, optim, loss=Trace_ELBO())
    gen = torch.Generator().manual_seed(args.seed)
    perm, pos, running = torch.randperm(n, generator=gen), 0, 0.0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        batch = data[perm[pos: pos + args.batch_size]]
        pos += args.batch_size
        running += -svi.step(batch) / batch.shape[0]
        if step % args.log_every == 0:
            print(
                f"step {step:5d}  ELBO/point {running / args.log_every:9.3f} nats  "
                f"obs scale {float(vae.decoder.obs_scale().detach()):.4f}  "
                f"{time.perf_counter() - start:6.1f}s",
                flush=True,
            )
            running = 0.0

    final = full_elbo(vae, data)
    elapsed = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "hparams": dict(vae.hparams),
            "state_dict": {k: v.detach().clone() for k, v in vae.state_dict().items()},
            "obs_scale": float(vae.decoder.obs_scale().detach()),
            "elbo_per_point": float(final),
            "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed},
        },
        args.out,
    )
    print(f"final full-data ELBO/point {final:.3f} nats; trained in {elapsed:.1f}s")
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
