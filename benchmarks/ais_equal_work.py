"""pyro_mi's AIS sandwich against a hand-written vectorised AIS loop doing the same work.

Issue 13's comparison: linear-vae, prior as pi0, K = 16 forward chains and one reverse
chain per point (IM-AIS, eq. 14), N = 32 points, T = 300 annealing steps, L = 10 leapfrog
steps, sigmoid schedule. The hand-written loop is what a user would write in plain torch:
the densities as tensor expressions, gradients by autograd, forward and reverse chains in
one tensor, per-chain Metropolis accept; it runs with the step sizes that pyro_mi's pilot
chose (taken from pyro_mi's result), so both run the same kernels and their bounds agree
in distribution. pyro_mi's time includes its pilot (8 chains on T/5 steps) and everything
``ais_bounds`` does; the loop's does not. ``refine=0``: rerunning the points the pilot finds
far from their target with 10 T steps is more work than the loop does, and ``precondition="none"``:
the loop anneals from the prior in the packed coordinates, not from a per-point fit. CPU seconds (``time.process_time``), best of
``--repeats``, interleaved.

``--processes`` compares whole processes instead, start-up included (wall seconds, best of
``--repeats``): the command ``pyro-mi estimate --example linear-vae --method ais --proposal prior``
with the same K, N, T, L, against a process that imports torch alone and runs the loop on data and
step sizes saved by this script. Usage::

    OMP_NUM_THREADS=1 python benchmarks/ais_equal_work.py [--repeats 5] [--modes auto none trace] [--steps 300]
        [--processes]
"""

from __future__ import annotations

import argparse
import inspect
import math
import subprocess
import sys
import tempfile
import time

import pyro
import torch

from pyro_mi.bounds import ais_bounds
from pyro_mi.density import ModelDensity
from pyro_mi.examples import get_example
from pyro_mi.proposal import PriorProposal
from pyro_mi.samplers import get_schedule


def hand_loop(W, b, x, z_post, K, T, L, step_sizes, generator, betas=None):
    """IM-AIS log p(x) bounds (N,) from K forward chains and one reverse chain, written out (the
    sigmoid schedule unless ``betas`` are given)."""
    N, D = z_post.shape
    c = 0.5 * math.log(2 * math.pi)

    def parts(z):  # log p(z), log p(x|z) and their gradients, by autograd
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            lp = (-0.5 * z * z - c).sum(-1)
            r = x - (z @ W.T + b)
            ll = (-0.5 * r * r - c).sum(-1)
            gp, gl = torch.autograd.grad(lp.sum(), z, retain_graph=True)[0], torch.autograd.grad(ll.sum(), z)[0]
        return lp.detach(), ll.detach(), gp, gl

    betas = (get_schedule("sigmoid", T) if betas is None else betas).to(x.dtype)
    step_sizes = step_sizes.to(x.dtype)
    z = torch.cat([torch.randn(K, N, D, generator=generator), z_post.unsqueeze(0)])
    rev = torch.tensor([False] * K + [True]).unsqueeze(1)  # (K + 1, 1)
    lp, ll, gp, gl = parts(z)
    logw = torch.zeros(K + 1, N)
    for j in range(1, T + 1):
        hi = torch.where(rev, T - j + 1, j)  # a reverse chain walks the ladder from the top
        logw = logw + (betas[hi] - betas[hi - 1]) * ll
        if j == T:
            break
        t = torch.where(rev, T - j, j)
        beta, eps = betas[t].unsqueeze(-1), step_sizes[t.squeeze(1)].unsqueeze(-1)  # (K+1, 1, 1), (K+1, N, 1)
        r0 = torch.randn(z.shape, generator=generator)
        zn, r = z, r0 + 0.5 * eps * (gp + beta * gl)
        for i in range(L):
            zn = zn + eps * r
            lpn, lln, gpn, gln = parts(zn)
            r = r + (0.5 if i == L - 1 else 1.0) * eps * (gpn + beta * gln)
        b2 = beta.squeeze(-1)
        dh = -(lpn + b2 * lln) + 0.5 * (r * r).sum(-1) + (lp + b2 * ll) - 0.5 * (r0 * r0).sum(-1)
        acc = torch.rand(dh.shape, generator=generator) < torch.exp(torch.clamp(-dh, max=0.0)).nan_to_num(0.0)
        a3 = acc.unsqueeze(-1)
        z, lp, ll = torch.where(a3, zn, z), torch.where(acc, lpn, lp), torch.where(acc, lln, ll)
        gp, gl = torch.where(a3, gpn, gp), torch.where(a3, gln, gl)

    def lme(t):  # log-mean-exp written out: the loop's own process imports torch alone
        return torch.logsumexp(t, 0) - math.log(t.shape[0])

    return lme(logw[:K]), lme(torch.cat([logw[K:], logw[: K - 1]]))


#: the loop's process after :func:`hand_loop`'s source: torch alone, the data and step sizes from the file given
LOOP_PROCESS = """
torch.set_num_threads(1)
s = torch.load(sys.argv[1])
hand_loop(s["W"], s["b"], s["x"], s["z"], s["K"], s["T"], s["L"], s["step_sizes"], torch.Generator().manual_seed(0),
          s["betas"])
"""


def table_of(rows: dict, unit: str, reference: str, extra: dict | None = None) -> None:
    """Prints ``rows`` {name: seconds} as a table with each row's ratio to ``reference`` (and a gap column)."""
    ref = rows[reference]
    print(f"| implementation | {unit} | ÷ {reference} |" + (" gap (nats) |" if extra else "")
          + "\n|---|---|---|" + ("---|" if extra else ""))
    for name, s in rows.items():
        print(f"| {name} | {s:.2f} | {s / ref:.2f} |" + (f" {extra[name]:.3f} |" if extra else ""))


def processes(args, K, N, T, L, ex, x, z, table) -> None:
    """Whole processes, start-up included: pyro-mi's command against torch and the loop."""
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        saved = Path(tmp) / "loop.pt"
        torch.save(dict(W=ex.params["W"], b=ex.params["b"], x=x["x"], z=z, K=K, T=T, L=L, step_sizes=table,
                        betas=get_schedule("sigmoid", T)), saved)
        script = Path(tmp) / "loop.py"
        script.write_text("import math\nimport sys\n\nimport torch\n\n\n" + inspect.getsource(hand_loop) + LOOP_PROCESS)
        commands = {
            "pyro-mi estimate (whole process)": [sys.executable, "-m", "pyro_mi.cli", "estimate", "--example",
                                                 "linear-vae", "--method", "ais", "--proposal", "prior",
                                                 "--num-data", str(N), "--num-chains", str(K), "--num-steps", str(T),
                                                 "--num-leapfrog", str(L), "--refine", "0", "--precondition", "none",
                                                 "--no-progress"],
            "torch + hand-written loop (whole process)": [sys.executable, str(script), str(saved)],
        }
        best = {}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                t = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True)
                best[name] = min(best.get(name, math.inf), time.perf_counter() - t)
    print(f"linear-vae, prior as pi0, K={K} forward + 1 reverse, N={N}, T={T}, L={L}; wall seconds of whole "
          f"processes, best of {args.repeats}, 1 thread; torch {torch.__version__}")
    table_of(best, "wall s", "torch + hand-written loop (whole process)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["auto", "none", "trace"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=300, help="T (the issue's comparison: 300)")
    ap.add_argument("--processes", action="store_true", help="time whole processes, start-up included")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    K, N, T, L = 16, 32, args.steps, 10
    ex = get_example("linear-vae")
    d = ModelDensity(ex.model, "x")
    pyro.set_rng_seed(0)
    x, z = d.sample(N)
    W, b = ex.params["W"], ex.params["b"]
    with torch.no_grad():
        log_lik = d.log_likelihood(x, z)
    if args.processes:
        r = ais_bounds(d, PriorProposal(d), x, z, num_chains=K, num_steps=T, num_leapfrog=L,
                       generator=torch.Generator().manual_seed(0), progress=False, refine=0.0,
                       precondition="none")
        processes(args, K, N, T, L, ex, x, z, r.diagnostics["step_sizes"])
        return
    best: dict = {}
    gaps: dict = {}

    def timed(name, fn):
        t = time.process_time()
        gap = fn()
        best[name] = min(best.get(name, math.inf), time.process_time() - t)
        gaps[name] = gap

    table = None
    for _ in range(args.repeats):
        for mode in args.modes:
            def run(mode=mode):
                nonlocal table
                r = ais_bounds(d, PriorProposal(d), x, z, num_chains=K, num_steps=T, num_leapfrog=L,
                               generator=torch.Generator().manual_seed(0), progress=False, compile=mode,
                               refine=0.0, precondition="none")
                table = r.diagnostics["step_sizes"]
                return r.gap
            timed(f"pyro_mi (compile={mode})", run)

        def loop():
            elbo, eubo = hand_loop(W, b, x["x"], z, K, T, L, table, torch.Generator().manual_seed(0))
            return float(((log_lik - elbo) - (log_lik - eubo)).mean())
        timed("hand-written loop (autograd)", loop)
    print(f"linear-vae, prior as pi0, K={K} forward + 1 reverse, N={N}, T={T}, L={L}; CPU seconds, best of "
          f"{args.repeats}, {args.threads} thread(s); torch {torch.__version__}")
    table_of(best, "CPU s", "hand-written loop (autograd)", gaps)


if __name__ == "__main__":
    main()
