"""Paired exact-validity table: each bound against the exact per-point MI, over seeds and adapt modes.

The comparison of ``tests/test_validity.py``, run over several seeds and printed as a
table for the record. On models whose marginal log p(x) is exact (``tests/models.py``,
``EXACT_MODELS``), each simulated point (x_i, z_i) has the exact MI
m_i = log p(x_i|z_i) - log p(x_i). For a method's per-point MI bounds l_i, u_i on the
same points:

* lower violation  mean(l_i - m_i)   (must be <= 0: a positive value with z > 3 means
  the "lower bound" sits above the truth);
* upper violation  mean(m_i - u_i)   (must be <= 0 likewise);
* gap              mean(u_i - l_i);
* E[w/p(x)] - 1    for AIS methods: the forward log weights (K, N), r_i = mean_k
  exp(log w_ki - log p(x_i)), mean(r_i - 1) (0 for unbiased weights). With heavy-tailed
  weights (the prior as pi0 at small T) the sample mean and its se are unreliable.

Each value is pooled over all seeds (N points per seed, so N x seeds paired values),
shown as mean ± se with z = mean / se; ``seeds>3se`` counts the seeds on which either
side alone has z > 3. The CPU column is the process time of one run (one thread).

AIS methods run at their default adapt mode (no ``adapt`` argument; marked ``*``), at
the exact ``pilot`` mode when the default is not it, and at ``online`` (kernels that
adapt along each chain's own past: the approximate mode, expected to violate at some T,
which shows the test's power).

Usage::

    python benchmarks/validity_table.py --quick   # 2 models, T in {100, 1000}, N = 500: minutes
    python benchmarks/validity_table.py           # every model, method and T, N = 1000
    python benchmarks/validity_table.py --models beta-binomial --methods ais --steps 1000

Options: ``--seeds``, ``--num-data``, ``--models``, ``--methods``, ``--steps``,
``--modes`` (adapt modes, ``default`` for the no-argument call), ``--threads``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the exact-marginal models live with the tests
try:
    import pyro_mi  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from models import EXACT_MODELS  # noqa: E402
from pyro_mi.bounds import METHODS, bound_class  # noqa: E402
from pyro_mi.density import ModelDensity  # noqa: E402
from pyro_mi.proposal import GaussianEncoder, PriorProposal, fit_guide  # noqa: E402

AIS_METHODS = ("ais", "im-ais", "cr-ais", "bdmc")
ALL_METHODS = ("ba", "iwae") + AIS_METHODS

#: (model, proposal, methods, T values) blocks of the full table
FULL_PLAN = [
    ("linear-gaussian", "encoder", ALL_METHODS, (10, 100, 1000)),
    ("linear-gaussian", "prior", ALL_METHODS, (10, 100, 1000)),
    ("two-sites", "prior", ALL_METHODS, (10, 100, 1000)),
    ("beta-binomial", "prior", ALL_METHODS, (10, 100, 1000)),
    ("gamma-poisson", "prior", ALL_METHODS, (10, 100, 1000)),
]
#: the --quick table: the default proposal on the linear-Gaussian model, one conjugate model
QUICK_PLAN = [
    ("linear-gaussian", "encoder", ("ba", "iwae", "ais", "cr-ais", "bdmc"), (100, 1000)),
    ("beta-binomial", "prior", ("ais", "cr-ais"), (100, 1000)),
]
FIT_STEPS = 200


# ---------------------------------------------------------------- set-up
def base_seed(seed: int) -> int:
    """Seed of a table seed's simulated points; the encoder fit uses +1 and every bound +2."""
    return 1000 * seed


def simulate(model_name: str, proposal: str, seed: int, num_data: int):
    """Simulates ``num_data`` points from a model with seed ``seed``; builds the proposal.

    Returns ``(density, q, x, z, m, log_px)``: ``m`` (N,) the exact per-point MI and
    ``log_px`` (N,) the exact log marginal, both float64 nats. The encoder proposal is a
    :class:`GaussianEncoder` fitted for ``FIT_STEPS`` BA steps from seed ``seed + 1``.
    """
    exact = EXACT_MODELS[model_name]()
    density = ModelDensity(exact.model, "x")
    pyro.set_rng_seed(seed)
    x, z = density.sample(num_data)
    log_px = exact.log_px(x["x"])
    with torch.no_grad():
        m = density.log_likelihood(x, z).double() - log_px
    if proposal == "prior":
        q = PriorProposal(density)
    else:
        pyro.set_rng_seed(seed + 1)
        q = GaussianEncoder(density)
        fit_guide(density, q, num_steps=FIT_STEPS, progress=False)
    return density, q, x, z, m, log_px


def adapt_default(method: str):
    """The default ``adapt`` of a method (None for methods without one)."""
    f = bound_class(method).option_fields().get("adapt")
    return None if f is None else f.default


def choose_modes(requested: list[str] | None) -> list[str]:
    """Adapt modes of the AIS rows: ``default``, the exact mode if the default is not it, ``online``."""
    if requested:
        return requested
    default = adapt_default("ais")
    exact = "pilot"
    modes = ["default"]
    if default != exact:
        modes.append(exact)
    if default != "online":
        modes.append("online")
    return modes


# ---------------------------------------------------------------- one run
def run_one(method: str, setup, seed: int, num_steps: int | None, mode: str | None) -> dict:
    """Runs one bound; returns its paired differences (N,) and weight ratios, and CPU seconds."""
    density, q, x, z, m, log_px = setup
    opts = {}
    if num_steps is not None:
        opts["num_steps"] = num_steps
    if mode not in (None, "default"):
        opts["adapt"] = mode
    pyro.set_rng_seed(seed + 2)
    t0 = time.process_time()
    r = METHODS[method](density, q, x, z, progress=False, **opts)
    cpu = time.process_time() - t0
    lw = (r.diagnostics or {}).get("log_weights_forward")
    return {
        "lower": r.lower_per_point.double() - m,
        "upper": m - r.upper_per_point.double(),
        "gap": (r.upper_per_point - r.lower_per_point).double(),
        "ratio": None if lw is None else torch.exp(lw.double() - log_px).mean(0) - 1,
        "cpu": cpu,
        "settings": dict(r.settings or {}),
    }


def mean_se(d: torch.Tensor) -> tuple[float, float, float]:
    """Mean, standard error and z of a vector of paired values."""
    mean = float(d.mean())
    se = float(d.std() / math.sqrt(d.numel()))
    return mean, se, (mean / se if se > 0 else float("nan"))


# ---------------------------------------------------------------- table
HEADER = (
    "| model | q | method | adapt | T | K | N | lower viol ± se | z | upper viol ± se | z "
    "| gap | E[w/p]−1 ± se | z | seeds>3se | CPU s/run |"
)


def fmt_row(model: str, proposal: str, method: str, mode: str, runs: list[dict]) -> str:
    """One markdown row from the runs of all seeds (pooled paired differences)."""
    s = runs[0]["settings"]
    T = s.get("num_steps", "—")
    K = s.get("num_chains", s.get("num_particles", "—"))
    shown_mode = "—" if mode is None else (f"{s.get('adapt', '?')}*" if mode == "default" else mode)
    cells = []
    for side in ("lower", "upper"):
        mean, se, z = mean_se(torch.cat([r[side] for r in runs]))
        cells += [f"{mean:+.4f} ± {se:.4f}", f"{z:+.1f}" + (" ⚠" if z > 3 else "")]
    gap = float(torch.cat([r["gap"] for r in runs]).mean())
    if runs[0]["ratio"] is not None:
        mean, se, z = mean_se(torch.cat([r["ratio"] for r in runs]))
        w = [f"{mean:+.4f} ± {se:.4f}", f"{z:+.1f}" + (" ⚠" if abs(z) > 3 else "")]
    else:
        w = ["—", "—"]
    bad = sum(max(mean_se(r["lower"])[2], mean_se(r["upper"])[2]) > 3 for r in runs)
    n = sum(r["lower"].numel() for r in runs)
    cpu = sum(r["cpu"] for r in runs) / len(runs)
    return (
        f"| {model} | {proposal} | {method} | {shown_mode} | {T} | {K} | {n} | {cells[0]} | {cells[1]} "
        f"| {cells[2]} | {cells[3]} | {gap:.4f} | {w[0]} | {w[1]} | {bad}/{len(runs)} | {cpu:.1f} |"
    )


def main(argv=None) -> int:
    """Parses the options, runs the plan and prints the table (markdown) to stdout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the small table (2 models, T in {100, 1000})")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num-data", type=int, default=None, help="points per seed (default 500 quick, 1000 full)")
    ap.add_argument("--models", nargs="+", choices=sorted(EXACT_MODELS), default=None)
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=None)
    ap.add_argument("--steps", type=int, nargs="+", default=None, help="T values of the AIS rows")
    ap.add_argument("--modes", nargs="+", default=None, help="adapt modes ('default' = no argument)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    num_data = args.num_data or (500 if args.quick else 1000)
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    modes = choose_modes(args.modes)

    rows, notes = [], []
    t_start = time.time()
    for model, proposal, methods, steps in plan:
        if args.models and model not in args.models:
            continue
        methods = [mt for mt in methods if not args.methods or mt in args.methods]
        steps = tuple(args.steps) if args.steps else steps
        setups = {seed: simulate(model, proposal, base_seed(seed), num_data) for seed in args.seeds}
        jobs = []  # (method, T, mode)
        for method in methods:
            if method in AIS_METHODS:
                jobs += [(method, t, mode) for t in steps for mode in modes]
            else:
                jobs.append((method, None, None))
        for method, t, mode in jobs:
            runs = []
            for seed in args.seeds:
                runs.append(run_one(method, setups[seed], base_seed(seed), t, mode))
                print(f"[{time.time() - t_start:7.1f}s] {model} {proposal} {method} T={t} {mode} seed={seed} "
                      f"cpu={runs[-1]['cpu']:.1f}s", file=sys.stderr, flush=True)
            rows.append(fmt_row(model, proposal, method, mode, runs))
        exact_mi = EXACT_MODELS[model]().true_mi
        mean_m = float(torch.cat([s[4] for s in setups.values()]).mean())
        notes.append(f"{model}: I(x; z) = {exact_mi:.4f} nats; mean m_i over the simulated points = {mean_m:.4f}")

    print(f"Paired exact validity: {len(args.seeds)} seeds x N = {num_data} points, "
          f"torch {torch.__version__}, pyro {pyro.__version__}, {args.threads} thread(s); "
          f"violation = mean(l - m) (lower), mean(m - u) (upper), nats; ⚠ = z > 3 (|z| > 3 for E[w/p]-1); "
          f"* = the method's default adapt mode.")
    print()
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    print("\n".join(rows))
    print()
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
