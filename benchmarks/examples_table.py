"""The built-in examples as the README runs them, and N, K, T against the interval's width.

The first table runs ``pyro-mi estimate --example E --method M --json`` in fresh processes (the
README's commands, defaults: N = 1024, IWAE K = 250, AIS K = 4, T = 100 with the pilot, the
shipped encoder as proposal) and prints the sandwich, the 95% interval for the model's MI, the
true MI where it is known, the number of warnings and the wall seconds of the whole command
(start-up included, best of ``--repeats``). The second runs ``estimate_mi`` in this process on a
grid of (N, K, T) of about equal cost and prints the gap, the standard error and the interval's
width (seconds of ``estimate_mi``, simulation included): at equal seconds, more points usually beat more samples per point. Usage::

    OMP_NUM_THREADS=1 python benchmarks/examples_table.py [--repeats 2] [--no-grid]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

COMMANDS = [("linear-vae", "iwae"), ("linear-vae", "ais"), ("digits-vae", "iwae"), ("digits-vae", "ais")]
GRID = [("iwae", 256, 1000, None), ("iwae", 1024, 250, None), ("iwae", 4096, 64, None),
        ("ais", 256, 16, 100), ("ais", 1024, 4, 100)]


def commands(repeats: int) -> None:
    """Prints the README's example commands: bounds, interval, warnings and wall seconds."""
    print("| command | lower | upper | 95% interval | true MI | warnings | wall s |")
    print("|---|---|---|---|---|---|---|")
    for example, method in COMMANDS:
        argv = ["pyro-mi", "estimate", "--example", example, "--method", method]
        walls = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "pyro_mi.cli", *argv[1:], "--json"], check=True,
                                 capture_output=True, text=True).stdout
            walls.append(time.perf_counter() - t)
        r = json.loads(out)
        lo, hi = r["interval_95"]
        truth = f"{r['true_mi']:.3f}" if r.get("true_mi") is not None else "—"
        print(f"| `{' '.join(argv)}` | {r['lower']:.3f} ± {r['lower_stderr']:.3f} | {r['upper']:.3f} | "
              f"[{lo:.2f}, {hi:.2f}] | {truth} | {len(r['warnings'])} | {min(walls):.1f} |", flush=True)


def grid() -> None:
    """Prints gap, standard error and interval width on a grid of N, K and T (seconds of the bound)."""
    import torch

    import pyro_mi
    from pyro_mi.examples import get_example, shipped_encoder

    torch.set_num_threads(1)
    print()
    print("| example | method | N | K | T | gap | stderr | 95% interval width | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("linear-vae", "digits-vae"):
        ex = get_example(name)
        for method, n, k, steps in GRID:
            opts = {"num_particles": k} if method == "iwae" else {"num_chains": k, "num_steps": steps}
            r = pyro_mi.estimate_mi(ex.model, "x", method=method, num_data=n, seed=0, progress=False,
                                    proposal=shipped_encoder(name), **opts)
            lo, hi = r.interval
            print(f"| {name} | {method} | {n} | {k} | {steps or ''} | {r.gap:.3f} | {r.lower_stderr:.3f} | "
                  f"{hi - lo:.3f} | {r.seconds:.2f} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-grid", action="store_true")
    args = ap.parse_args()
    commands(args.repeats)
    if not args.no_grid:
        grid()


if __name__ == "__main__":
    main()
