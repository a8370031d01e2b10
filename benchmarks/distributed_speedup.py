"""Speed-up of torchrun processes over one process, and the memory of each rank.

    python benchmarks/distributed_speedup.py [--num-data 4096] [--methods iwae ais]

For each method it runs the same estimate on linear-vae (10 latents, 100 observed) three
ways on this machine: one process with one thread (the baseline), one process with as
many threads as processes, and ``torchrun --nproc_per_node P`` with one thread each. It
prints the wall time of the whole command (imports, simulation and the proposal fit,
which every rank repeats, included), the time of the estimate itself, the speed-up over
the baseline, each rank's peak resident memory, and whether the bounds equal the
baseline's bit for bit (they must: blocks of points carry their own random numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[1])
OPTIONS = {"iwae": dict(num_particles=1000), "ais": dict(num_chains=4, num_steps=100, precondition="none")}


def worker(args) -> None:
    """One process (a rank under torchrun): runs the estimate, prints a JSON line per rank."""
    import torch

    from pyro_mi import distributed, estimate_mi
    from pyro_mi.examples import get_example

    torch.set_num_threads(args.threads)
    distributed.init()
    rank, size = distributed.world()
    ex = get_example("linear-vae")
    r = estimate_mi(ex.model, ex.obs_sites, method=args.method, num_data=args.num_data, seed=0, progress=False,
                    points_per_block=args.points_per_block, **OPTIONS[args.method])
    line = {"rank": rank, "processes": size, "seconds": r.seconds, "lower": r.lower, "upper": r.upper,
            "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("RESULT " + json.dumps(line), flush=True)
    distributed.leave()


def launch(method: str, processes: int, threads: int, args) -> tuple[float, list[dict]]:
    flags = [__file__, "--worker", "--method", method, "--threads", str(threads), "--num-data", str(args.num_data),
             "--points-per-block", str(args.points_per_block)]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={port}"] + flags
    else:
        cmd = [sys.executable] + flags
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT}
    start = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    lines = [json.loads(ln[len("RESULT "):]) for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    return wall, sorted(lines, key=lambda d: d["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="ais", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", default=["iwae", "ais"], choices=sorted(OPTIONS))
    parser.add_argument("--num-data", type=int, default=4096)
    parser.add_argument("--points-per-block", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    P = args.processes
    print(f"linear-vae, N = {args.num_data}, blocks of {args.points_per_block} points, {os.cpu_count()} CPUs")
    print(f"{'method':8} {'run':24} {'wall s':>8} {'estimate s':>11} {'speed-up':>9} {'peak MiB/rank':>18} "
          f"{'same bounds':>12}")
    for method in args.methods:
        base = None
        for label, processes, threads in (("1 process, 1 thread", 1, 1), (f"1 process, {P} threads", 1, P),
                                          (f"{P} processes, 1 thread", P, 1)):
            wall, ranks = launch(method, processes, threads, args)
            r0 = ranks[0]
            base = base or (wall, r0)
            same = (r0["lower"], r0["upper"]) == (base[1]["lower"], base[1]["upper"])
            mem = " / ".join(f"{d['max_rss_mib']:.0f}" for d in ranks)
            print(f"{method:8} {label:24} {wall:8.1f} {r0['seconds']:11.1f} {base[0] / wall:8.2f}x {mem:>18} "
                  f"{str(same):>12}")


if __name__ == "__main__":
    main()
