"""The model zoo: every model of :mod:`pyro_mi.examples.zoo`, called as its author calls it,
through ``pyro_mi.estimate_mi`` with ``iwae`` and ``ais`` at their defaults.

Prints one row per model and method: whether it ran unchanged, lower, upper, gap (nats), seconds,
and its warnings; where the marginal is exact, the paired difference of each side from the exact
per-point MI (mean ± standard error over the N points: lower - truth must be <= 0 and
upper - truth >= 0 within noise).

    OMP_NUM_THREADS=1 python benchmarks/model_zoo.py [--models NAME ...] [--methods iwae ais]
        [--num-data N] [--preset fast|default|tight] [--json FILE] [--cli] [--seeds S ...]
        [--option NAME=VALUE ...]

The docs' ``docs/generated/model_zoo.md`` is this script's output (``benchmarks/docs_page.py``).

``--cli`` also runs each model through ``pyro-mi estimate`` (the zoo module's functions as
targets, their arguments saved to files and passed by name) and says whether it ran.

``--speed`` instead times each model that pyro_mi runs point by point (by vmap) against the same
model rewritten to broadcast (``benchmarks/zoo_broadcast.py``), both at the methods' defaults in
this process, interleaved, best of two: the ratio is the price of writing a model for one point.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch

import pyro_mi
from pyro_mi.examples.zoo import zoo


def paired(result, model) -> dict:
    """Paired differences of each side from the exact per-point MI, where the zoo has log p(x)."""
    if model.log_marginal is None:
        return {}
    exact = model.log_marginal(result.x).double()
    out = {}
    for side, key in (("lower", "log_p_x_upper"), ("upper", "log_p_x_lower")):
        pp = getattr(result, f"{side}_per_point")
        log_px = result.diagnostics.get(key)
        if pp is None or log_px is None:
            continue
        diff = (exact - log_px.double())  # side - truth = (log_lik - log_px) - (log_lik - exact)
        out[side] = (float(diff.mean()), float(diff.std() / math.sqrt(diff.numel())))
    return out


def run(model, method: str, num_data: int, preset: str = "default", seed: int = 0, options: dict | None = None) -> dict:
    start = time.perf_counter()
    try:
        r = pyro_mi.estimate_mi(model.model, model.obs_sites, model_args=model.model_args,
                                model_kwargs=model.model_kwargs, guide=model.guide, method=method,
                                num_data=num_data, seed=seed, progress=False, preset=preset, **(options or {}))
    except Exception as e:  # noqa: BLE001 - the table reports it
        return {"ran": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                "seconds": time.perf_counter() - start}
    return {"ran": True, "lower": r.lower, "upper": r.upper, "gap": r.gap, "seconds": time.perf_counter() - start,
            "warnings": r.warnings, "notes": r.notes, "paired": paired(r, model), "vectorize": r.settings["vectorize"],
            "ceiling": model.ceiling}


def run_cli(model) -> str:
    """Runs the model through ``pyro-mi estimate`` (iwae, N = 64), its arguments saved to files and
    passed by name; returns "ran" or the error line."""
    import inspect

    import numpy as np

    target = model.extra.get("target", model.model.__name__)
    names = list(inspect.signature(model.model).parameters)
    with tempfile.TemporaryDirectory() as tmp:
        flags = []
        for name, value in zip(names, model.model_args):
            if isinstance(value, torch.Tensor):
                path = os.path.join(tmp, f"{name}.npy")
                np.save(path, value.numpy())
                flags += ["--data" if name == names[0] else "--model-arg", f"{name}={path}"]
            else:
                flags += ["--model-arg", f"{name}={value}"]
        if "guide" in model.extra:
            flags += ["--guide", f"pyro_mi.examples.zoo:{model.extra['guide']}"]
        cmd = [sys.executable, "-m", "pyro_mi.cli", "estimate", f"pyro_mi.examples.zoo:{target}",
               "--obs", *model.obs_sites, "--num-data", "64", "--json", *flags]
        out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode == 0:
        return "ran"
    return "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:150]


def speed(methods, models) -> None:
    """Times each model with a broadcasting rewrite against the rewrite (see the module docstring)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from zoo_broadcast import REWRITES

    warm = models["fully_pooled"]
    pyro_mi.estimate_mi(warm.model, warm.obs_sites, model_args=warm.model_args, num_data=64, method="ais",
                        num_steps=5, progress=False)  # first-call costs (imports) out of the timings
    print("| model | method | as written (s) | rewritten (s) | ratio | max difference of log p(z), log p(x|z) |")
    print("|---|---|---|---|---|---|")
    for name, rewrite in REWRITES.items():
        m = models[name]
        a = pyro_mi.ModelDensity(m.model, m.obs_sites, model_args=m.model_args)
        b = pyro_mi.ModelDensity(rewrite, m.obs_sites, model_args=m.model_args)
        torch.manual_seed(0)
        x, z = a.sample(256)
        diff = max(float((u - v).abs().max()) for u, v in zip(a.log_terms(x, z), b.log_terms(x, z)))
        for method in methods:
            times = {m.model: [], rewrite: []}
            for order in ((m.model, rewrite), (rewrite, m.model)):
                for model in order:
                    start = time.perf_counter()
                    try:
                        pyro_mi.estimate_mi(model, m.obs_sites, model_args=m.model_args, method=method, seed=0,
                                            progress=False)
                    except ValueError:  # a run that refuses its numbers still took its time
                        pass
                    times[model].append(time.perf_counter() - start)
            t_a, t_b = min(times[m.model]), min(times[rewrite])
            print(f"| {name} | {method} | {t_a:.2f} | {t_b:.2f} | {t_a / t_b:.2f} | {diff:.1e} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--methods", nargs="*", default=["iwae", "ais"])
    parser.add_argument("--num-data", type=int, default=1024)
    parser.add_argument("--json")
    parser.add_argument("--cli", action="store_true")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--preset", default="default", choices=("fast", "default", "tight"))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0], help="a row per seed (of the simulation)")
    parser.add_argument("--option", nargs="*", default=[], metavar="NAME=VALUE",
                        help="method options for every run (e.g. precondition=none refine=0.3)")
    args = parser.parse_args(argv)
    options = {k: _value(v) for k, v in (o.split("=", 1) for o in args.option)}
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    models = zoo()
    if args.speed:
        return speed(args.methods, models)
    rows = []
    lines = [f"pyro_mi {pyro_mi.__version__}, torch {torch.__version__}, N = {args.num_data}, preset {args.preset}, "
             f"{time.strftime('%Y-%m-%d')}",
             "| model | method | ran | lower | upper | gap | s | lower - truth | upper - truth | warnings |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, model in models.items():
        if args.models and name not in args.models:
            continue
        for method in args.methods:
            for seed in args.seeds:
                label = name if args.seeds == [0] else f"{name} (seed {seed})"
                row = {"model": label, "method": method, **run(model, method, args.num_data, args.preset, seed, options)}
                if args.cli and method == args.methods[0] and seed == args.seeds[0]:
                    row["cli"] = run_cli(model)
                rows.append(row)
                lines.append(_row(row))
                print(lines[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)


def _value(text: str):
    """A number where ``text`` is one, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _row(row: dict) -> str:
    def num(v):
        return "—" if v is None else f"{v:.3f}"

    def pair(side):
        p = row.get("paired", {}).get(side)
        return "" if p is None else f"{p[0]:+.3f} ± {p[1]:.3f}"

    cli = f" (cli: {row['cli']})" if "cli" in row else ""
    if not row["ran"]:
        return f"| {row['model']} | {row['method']} | no{cli} | | | | {row['seconds']:.1f} | | | {row['error']} |"
    warns = "; ".join(w[:120] for w in row["warnings"]) or ""
    return (f"| {row['model']} | {row['method']} | yes ({row['vectorize']}){cli} | {num(row['lower'])} | "
            f"{num(row['upper'])} | {num(row['gap'])} | {row['seconds']:.1f} | {pair('lower')} | {pair('upper')} | "
            f"{len(row['warnings'])}: {warns} |")


if __name__ == "__main__":
    main()
