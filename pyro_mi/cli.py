"""The ``pyro-mi`` command line.

::

    pyro-mi estimate TARGET --obs x [--guide TARGET] [--method ba|iwae|...] [--num-data N]
                    [--num-particles K] [--seed S] [--json]
    pyro-mi estimate --example linear-vae|digits-vae [same options]

TARGET is ``path/to/file.py:function`` or ``package.module:function``: a
one-data-point Pyro model (observed sites sample when not conditioned); a guide
TARGET takes the observed values as keyword arguments named after the observed
sites. Without ``--json`` a table is printed; with it, one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Callable

from .estimate import METHODS, estimate_mi

#: extra CLI options of the ``estimate`` command: (flag, argparse kwargs). Bound
#: modules add theirs; a value reaches a method only if its signature takes it.
ESTIMATE_OPTIONS: list[tuple[str, dict]] = [
    ("--num-particles", dict(type=int, help="K, importance samples per data point (ba, iwae)")),
    ("--num-chains", dict(type=int, help="K, AIS chains per data point (ais, im-ais, cr-ais, bdmc; default 16)")),
    ("--num-steps", dict(type=int, help="T, annealing steps (AIS methods; default 100; T=1 is IWAE)")),
    ("--num-leapfrog", dict(type=int, help="L, leapfrog steps per HMC transition (AIS methods; default 2)")),
    ("--step-size", dict(type=float, help="initial HMC step size, adapted per chain (AIS methods; default 0.05)")),
    ("--schedule", dict(choices=("linear", "sigmoid"), help="annealing schedule (AIS methods; default sigmoid)")),
    ("--adapt", dict(choices=("online", "two-round", "none"), help="step-size adaptation (AIS; default online)")),
    ("--checkpoint", dict(metavar="FILE", help="save AIS progress to FILE; rerunning the command resumes it")),
    ("--save-chains", dict(metavar="FILE.nc", help="write the AIS chains as ArviZ InferenceData (netCDF)")),
    ("--max-steps", dict(type=int, help="critic training steps (giwae, infonce; default 2000)")),
    ("--batch-size", dict(type=int, help="simulated pairs per training step (giwae, infonce; default 64)")),
    ("--lr", dict(type=float, help="critic/encoder Adam learning rate (giwae, infonce; default 1e-3)")),
]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def load_target(target: str) -> Callable:
    """Loads ``path/to/file.py:function`` or ``package.module:function``.

    Raises CLIError with a readable message if the file, module or function is missing.
    """
    if ":" not in target:
        raise CLIError(f"target {target!r} must be 'path/to/file.py:function' or 'package.module:function'")
    where, name = target.rsplit(":", 1)
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise CLIError(f"target file {where!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_pyro_mi_target_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.pop(0)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise CLIError(f"cannot import module {where!r}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CLIError(f"{where!r} has no function {name!r}")
    return fn


def _method_options(method: str, args: argparse.Namespace) -> dict:
    fn = METHODS[method]
    params = inspect.signature(fn).parameters
    opts = {}
    for flag, _ in ESTIMATE_OPTIONS:
        key = flag.lstrip("-").replace("-", "_")
        value = getattr(args, key, None)
        if value is not None and key in params:
            opts[key] = value
    return opts


def _estimate(args: argparse.Namespace) -> dict:
    from .examples import get_example

    true_mi = None
    if args.example:
        if args.target:
            raise CLIError("give either TARGET or --example, not both")
        ex = get_example(args.example)
        # The example's own encoder (digits-vae's VAE guide) was trained on real data with the
        # ELBO and is a poor proposal for simulated x; the default BA-fitted encoder is used
        # unless --guide names one (tutorials/01_digits_vae_ba_iwae.py compares the two).
        model, obs, true_mi = ex.model, ex.obs_sites, ex.true_mi
        guide = load_target(args.guide) if args.guide else None
    else:
        if not args.target:
            raise CLIError("give a model TARGET (path/to/file.py:function) or --example NAME")
        if not args.obs:
            raise CLIError("--obs is required with a model TARGET (the observed site names)")
        model, obs = load_target(args.target), tuple(args.obs)
        guide = load_target(args.guide) if args.guide else None
    if args.obs and args.example:
        obs = tuple(args.obs)
    result = estimate_mi(
        model,
        obs,
        method=args.method,
        guide=guide,
        proposal=args.proposal,
        num_data=args.num_data,
        seed=args.seed,
        fit_steps=args.fit_steps,
        progress=not args.json and not args.no_progress and sys.stderr.isatty(),
        **_method_options(args.method, args),
    )
    result.true_mi = true_mi
    return result


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``pyro-mi``."""
    parser = argparse.ArgumentParser(prog="pyro-mi", description="Mutual information bounds for Pyro models.")
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="bound the MI I(x; z) of a Pyro model")
    est.add_argument("target", nargs="?", help="path/to/file.py:function or package.module:function")
    est.add_argument("--example", help="a built-in example: linear-vae or digits-vae")
    est.add_argument("--obs", nargs="+", help="observed site name(s)")
    est.add_argument("--guide", help="guide TARGET q(z|x), called with the observed values as keywords")
    est.add_argument("--method", default="iwae", help="bound: " + ", ".join(sorted(METHODS)))
    est.add_argument("--proposal", default="guide", choices=("guide", "prior"))
    est.add_argument("--num-data", type=int, default=256, help="simulated data points N (default 256)")
    est.add_argument("--fit-steps", type=int, help="BA fitting steps for the proposal (default encoder: 1000)")
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--json", action="store_true", help="print one JSON object")
    est.add_argument("--no-progress", action="store_true")
    for flag, kwargs in ESTIMATE_OPTIONS:
        est.add_argument(flag, **kwargs)
    est.set_defaults(run=_estimate)
    for extra in SUBCOMMANDS:
        extra(sub)
    return parser


#: functions ``add(subparsers)`` that register further subcommands (with ``set_defaults(run=...)``).
SUBCOMMANDS: list[Callable] = []

from .samples import add_estimate_samples_command  # noqa: E402

SUBCOMMANDS.append(add_estimate_samples_command)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyro-mi``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "method", None) is not None and args.command == "estimate" and args.method not in METHODS:
        parser.error(f"unknown --method {args.method!r}; choose one of {', '.join(sorted(METHODS))}")
    try:
        result = args.run(args)
    except (CLIError, ValueError, TypeError) as e:
        print(f"pyro-mi: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict()) if args.json else str(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
