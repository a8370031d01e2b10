"""Peak memory of an AIS run against the number of annealing steps T.

Each row runs ``ais_bounds`` on the linear-vae example (prior as pi0) in a fresh
subprocess and prints its peak resident memory (``ru_maxrss``) and the memory before the
run. Without ``record`` the per-chain state is kept, not its history, so memory should not
grow with T (eager and without ``refine``, so that neither torch's compiler stack, imported by a
traced run, nor the rerun of far points at 10 T enters the comparison); ``--record`` keeps the
chains for ArviZ and grows as K·N·T. Usage::

    OMP_NUM_THREADS=1 python benchmarks/ais_memory.py [--chains 2048] [--num-data 64] [--steps 50 500] [--record]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = """
import resource, sys, torch, pyro
torch.set_num_threads(1)
from pyro_mi.bounds import ais_bounds
from pyro_mi.density import ModelDensity
from pyro_mi.examples import get_example
from pyro_mi.proposal import PriorProposal
T, K, N, record = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
ex = get_example("linear-vae"); d = ModelDensity(ex.model, "x"); pyro.set_rng_seed(0); x, z = d.sample(N)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ais_bounds(d, PriorProposal(d), x, z, num_chains=K, num_steps=T, num_leapfrog=1, record=record, progress=False,
           compile="none", refine=0.0, precondition="none")
print(before / 1024, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", type=int, default=2048)
    ap.add_argument("--num-data", type=int, default=64)
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 500])
    ap.add_argument("--record", action="store_true")
    args = ap.parse_args()
    print(f"ais on linear-vae, K = {args.chains}, N = {args.num_data}, L = 1, record = {args.record}\n")
    print("| T | MiB before the run | peak MiB |")
    print("|---|---|---|")
    for T in args.steps:
        out = subprocess.run([sys.executable, "-c", CHILD, str(T), str(args.chains), str(args.num_data),
                              "1" if args.record else "0"], capture_output=True, text=True, check=True)
        before, peak = map(float, out.stdout.split())
        print(f"| {T} | {before:.0f} | {peak:.0f} |", flush=True)


if __name__ == "__main__":
    main()
