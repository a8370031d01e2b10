"""pyro_mi's sample-only estimators beside the bmi benchmark's own (Czyż et al. 2023).

Draws 10,000 samples (seed 0) of 13 tasks of bmi (PyPI ``benchmark-mi``): multinormal
1×1 to 25×25, dense and sparse; Student-t with 1–3 degrees of freedom (the 1×1 one with
1 degree of freedom is Cauchy-tailed); half-cube, asinh and spiral transforms; additive
noise; and a 5×5 multinormal with MI 6.46 nats. On each it runs pyro_mi's
``estimate_mi_samples`` (MINE, NWJ, InfoNCE, defaults) and bmi's estimators (InfoNCE,
Donsker–Varadhan, NWJ, CCA, KSG, defaults), and prints every estimate, the mean absolute
error against the true MI over the 12 tasks other than the Cauchy one (over all 13 in
brackets) and the seconds per task. pyro_mi's estimates carry their warnings: a "!"
marks a number reported with a warning; "*" a lower bound more than 3 standard errors
above the truth.

    pip install -e ".[bench]"
    OMP_NUM_THREADS=1 python benchmarks/samples_bmi.py [--bmi-cache bmi.json] [--tasks NAME ...]

``--bmi-cache`` keeps bmi's results (they take about 10 minutes) in a JSON file and reuses
them on the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import time

import numpy as np
import torch

import pyro_mi

NUM_SAMPLES = 10_000
CAUCHY = "student-identity-1-1-1"
BMI_TASKS = (
    "1v1-normal-0.75",
    "multinormal-dense-5-5-0.5",
    "multinormal-dense-25-25-0.5",
    "multinormal-sparse-5-5-2-2.0",
    "multinormal-sparse-25-25-2-2.0",
    CAUCHY,
    "student-identity-3-3-2",
    "student-identity-5-5-3",
    "half_cube-multinormal-sparse-5-5-2-2.0",
    "asinh-student-identity-3-3-2",
    "spiral-multinormal-sparse-5-5-2-2.0",
    "1v1-additive-0.1",
)
HIGH_MI = "multinormal-5-5-high"  # 5 pairs of correlation 0.9615: MI 6.458 nats
OURS = ("mine", "nwj", "infonce")
THEIRS = ("infonce", "dv", "nwj", "cca", "ksg")


def tasks(names):
    """``{name: (x, y, true MI)}`` drawn with seed 0."""
    import bmi

    out = {}
    for name in names:
        if name == HIGH_MI:
            rho, d = 0.9615, 5
            cov = np.block([[np.eye(d), rho * np.eye(d)], [rho * np.eye(d), np.eye(d)]])
            sampler = bmi.samplers.SplitMultinormal(dim_x=d, dim_y=d, covariance=cov)
            x, y = sampler.sample(NUM_SAMPLES, 0)
            out[name] = (np.asarray(x), np.asarray(y), float(sampler.mutual_information()))
        else:
            task = bmi.benchmark.BENCHMARK_TASKS[name]
            x, y = task.sample(NUM_SAMPLES, seed=0)
            out[name] = (np.asarray(x), np.asarray(y), float(task.mutual_information))
    return out


def run_bmi(x, y) -> dict:
    import bmi

    est = bmi.estimators
    estimators = {
        "infonce": est.InfoNCEEstimator(verbose=False),
        "dv": est.DonskerVaradhanEstimator(verbose=False),
        "nwj": est.NWJEstimator(verbose=False),
        "cca": est.CCAMutualInformationEstimator(),
        "ksg": est.KSGEnsembleFirstEstimator(),
    }
    out = {}
    for key, e in estimators.items():
        start = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):
            value = float(e.estimate(x, y))
        out[key] = {"value": value, "seconds": time.perf_counter() - start}
    return out


def run_ours(x, y) -> dict:
    out = {}
    for method in OURS:
        start = time.perf_counter()
        r = pyro_mi.estimate_mi_samples(x, y, method, seed=0, progress=False)
        out[method] = {"value": r.lower, "stderr": r.lower_stderr, "warnings": list(r.warnings),
                       "stop": r.diagnostics["training"].stop_reason, "seconds": time.perf_counter() - start}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bmi-cache", help="JSON file for bmi's results (read if present, else written)")
    parser.add_argument("--tasks", nargs="*", default=list(BMI_TASKS) + [HIGH_MI])
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = {}
    if args.bmi_cache and os.path.exists(args.bmi_cache):
        with open(args.bmi_cache) as f:
            cache = json.load(f)
    rows = {}
    for name, (x, y, mi) in tasks(args.tasks).items():
        if name not in cache:
            cache[name] = run_bmi(x, y)
            if args.bmi_cache:
                with open(args.bmi_cache, "w") as f:
                    json.dump(cache, f, indent=1)
        rows[name] = (mi, run_ours(x, y), cache[name])
        print(f"{name}: true {mi:.3f}; pyro_mi " + ", ".join(
            f"{k} {v['value']:.3f} ({v['stop']})" for k, v in rows[name][1].items()), flush=True)

    def cell(v, mi):
        mark = ("!" if v.get("warnings") else "") + ("*" if v.get("stderr") and v["value"] - mi > 3 * v["stderr"] else "")
        return f"{v['value']:.3f}{mark}"

    head = [f"pyro_mi {m}" for m in OURS] + [f"bmi {m}" for m in THEIRS]
    print("\n| task | true MI | " + " | ".join(head) + " |")
    print("|---|---|" + "---|" * len(head))
    for name, (mi, ours, theirs) in rows.items():
        cells = [cell(ours[m], mi) for m in OURS] + [cell(theirs[m], mi) for m in THEIRS]
        print(f"| {name} | {mi:.3f} | " + " | ".join(cells) + " |")

    def mae(who, key, skip_cauchy):
        errs = [abs(r[who][key]["value"] - r[0]) for n, r in rows.items() if not (skip_cauchy and n == CAUCHY)]
        return sum(errs) / len(errs)

    def seconds(who, key):
        return sum(r[who][key]["seconds"] for r in rows.values()) / len(rows)

    maes = [(f"pyro_mi {m}", 1, m) for m in OURS] + [(f"bmi {m}", 2, m) for m in THEIRS]
    print("| mean abs. error, 12 tasks (all) | | " + " | ".join(
        f"{mae(w, k, True):.3f} ({mae(w, k, False):.3f})" for _, w, k in maes) + " |")
    print("| seconds per task | | " + " | ".join(f"{seconds(w, k):.1f}" for _, w, k in maes) + " |")
    negative = [(n, m, r[1][m]["value"]) for n, r in rows.items() for m in OURS
                if r[1][m]["value"] < -0.1 and not r[1][m]["warnings"]]
    print(f"\npyro_mi estimates below -0.1 nats without a warning: {negative or 'none'}")
    if any(math.isnan(r[1][m]["value"]) for r in rows.values() for m in OURS):
        print("some pyro_mi estimate is NaN")


if __name__ == "__main__":
    main()
