"""Time and peak memory of ``pyro-mi estimate-samples`` against the number of paired samples.

Each row writes n paired samples (x = z + 0.5 noise, 4 dims each, float32; true MI
2 log 5 = 3.219 nats) to an ``.npz`` file and runs the command line on it in a fresh process
(``--method mine``, its defaults: 5000 steps of batch 256), printing its wall time, its peak
resident memory (``ru_maxrss`` of the child) and the bound. Memory should stay within a small
multiple of the file plus a constant (the imports and one chunk of critic evaluations), and
time should not grow with n beyond the one pass over the test split. Usage::

    OMP_NUM_THREADS=1 python benchmarks/samples_scale.py [--sizes 5000 500000 5000000] [--max-steps 5000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 500_000, 5_000_000])
    ap.add_argument("--max-steps", type=int, default=5000)
    args = ap.parse_args()
    print(f"estimate-samples --method mine, {args.max_steps} steps, x = z + 0.5 noise in R^4 (true MI 3.219)\n")
    print("| n | file MB | wall s | peak RSS MB | lower ± stderr |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            z = rng.standard_normal((n, 4)).astype(np.float32)
            x = (z + 0.5 * rng.standard_normal((n, 4))).astype(np.float32)
            path = os.path.join(tmp, f"s{n}.npz")
            np.savez(path, x=x, z=z)
            del x, z
            before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "pyro_mi.cli", "estimate-samples", path, "--method", "mine",
                                  "--max-steps", str(args.max_steps), "--json"], capture_output=True, text=True)
            wall = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            if out.returncode != 0:
                print(f"| {n} | | | | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout)
            # ru_maxrss of children is the largest child so far: a row shows its own peak once it is the largest
            peak_mb = f"{peak / 1024:.0f}" if peak > before else f"<= {before / 1024:.0f}"
            print(f"| {n} | {os.path.getsize(path) / 1e6:.0f} | {wall:.1f} | {peak_mb} | "
                  f"{r['lower']:.3f} ± {r['lower_stderr']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
