"""Run by tests/test_distributed.py, in one process or under torchrun: bounds of the linear-vae
example per data point, saved by rank 0 to OUT.

    python tests/distributed_script.py OUT [--checkpoint FILE] [--interrupt-block B] [--exit-early]

``--interrupt-block B`` raises KeyboardInterrupt in the AIS run when block B reaches step 5;
``--exit-early`` makes rank 1 leave before any work (rank 0 must fail with a clear message).
"""

import argparse
import os

import torch

from pyro_mi import distributed, estimate_mi
from pyro_mi.examples import get_example

#: three blocks of 16 points: under 2 processes rank 0 runs blocks 0 and 2, rank 1 block 1
N, BLOCK = 48, 16
RUNS = {
    "iwae": dict(num_particles=20),
    "ais": dict(num_chains=2, num_steps=10),
    "mine-ais": dict(num_chains=2, num_steps=10, max_steps=20, eval_every=10, batch_size=32, num_val=16),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--checkpoint")
    parser.add_argument("--interrupt-block", type=int)
    parser.add_argument("--exit-early", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init(timeout=30)
    rank, _ = distributed.world()
    if args.exit_early and rank == 1:
        os._exit(3)
    ex = get_example("linear-vae", latent_dim=3, obs_dim=6)
    runs = RUNS if args.interrupt_block is None else {"ais": RUNS["ais"]}
    results = {}
    for method, options in runs.items():
        callback = None
        if args.interrupt_block is not None:
            def callback(key, state, info, b=args.interrupt_block):
                if key[-1] == b and state.step == 5:
                    raise KeyboardInterrupt
        if method != "iwae":
            options = {**options, "checkpoint": args.checkpoint, "callback": callback}
        r = estimate_mi(ex.model, ex.obs_sites, method=method, num_data=N, seed=1, fit_steps=50, progress=False,
                        points_per_block=BLOCK, **options)
        results[method] = {"lower": r.lower_per_point, "upper": r.upper_per_point, "warnings": r.warnings}
    if rank == 0:
        torch.save(results, args.out)
    distributed.leave()


if __name__ == "__main__":
    main()
