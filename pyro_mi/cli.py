"""The ``pyro-mi`` command line.

::

    pyro-mi estimate TARGET --obs x [--guide TARGET] [--method ba|iwae|...] [--num-data N]
                    [--num-particles K] [--seed S] [--json]
    pyro-mi estimate --example linear-vae|digits-vae|digits-gan [same options]

TARGET is ``path/to/file.py:name`` or ``package.module:name``, where ``name`` may be dotted
(``vae.model``, a method of an object the file makes): a Pyro model as its author wrote it.
Its arguments are given by name, ``--data NAME=FILE`` (the data; a lone FILE goes to the
model's first argument, or to the keyword named after the observed site) and ``--model-arg
NAME=FILE|VALUE`` (the others); the observed sites named by ``--obs`` are conditioned by name,
whatever the model passes to ``obs=``. A guide TARGET is called as the model is. Without
``--json`` a table is printed; with it, one strict-JSON object (``null``, never NaN or
Infinity).

Each method takes the flags of :data:`ESTIMATE_OPTIONS` that name a keyword
parameter of its bound function (:func:`method_options`); any other method flag
is an error. Failures exit with status 2 and one line on stderr (with ``--json``
also ``{"error": ...}`` on stdout); an error raised in the user's model file names
its ``file:line``. SIGINT and SIGTERM stop a run, the AIS methods and MINE-AIS saving
their ``--checkpoint``; the exit status is then 130 or 143.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import importlib
import importlib.util
import inspect
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from . import distributed
from .bounds import BOUNDS, METHODS, bound_class
from .checkpoint import check_output_path
from .estimate import estimate_mi
from .result import json_safe
from .runtime import Runtime


def _declared_flags() -> list[tuple[str, dict]]:
    """The method flags of the ``estimate`` command, from the declarations: every field of a bound
    (:data:`~pyro_mi.bounds.BOUNDS`) or of :class:`~pyro_mi.runtime.Runtime` with command-line metadata,
    once, in the order declared."""
    flags: dict[str, dict] = {}
    for cls in [bound_class(m) for m in BOUNDS] + [Runtime]:
        fields = cls.option_fields() if cls is not Runtime else {f.name: f for f in dataclasses.fields(Runtime)}
        for name, f in fields.items():
            if "cli" in f.metadata:
                flags.setdefault("--" + name.replace("_", "-"), dict(f.metadata["cli"]))
    return list(flags.items())


#: the method flags of the ``estimate`` command: (flag, argparse kwargs), built from the declarations'
#: fields (:func:`_declared_flags`). A flag applies to the methods whose declaration has the option of the
#: same name (``--max-steps``: ``max_steps``) or that use the runtime setting; the help lists them and their
#: defaults, read from the declarations.
ESTIMATE_OPTIONS: list[tuple[str, dict]] = _declared_flags()

#: the default N of ``--num-data``: estimate_mi's, so that the two front ends agree
NUM_DATA = inspect.signature(estimate_mi).parameters["num_data"].default

#: output files checked before any work starts: option name -> flag
OUTPUT_FILES = {"checkpoint": "--checkpoint", "save_chains": "--save-chains"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler of :func:`main`: a KeyboardInterrupt, so that whatever saves
    on Ctrl-C (the AIS checkpoint) saves on SIGTERM too."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors reach :func:`main` (for ``--json``) instead of exiting."""

    def error(self, message):
        raise _UsageError(message, self.format_usage())


class _UsageError(CLIError):
    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


# --------------------------------------------------------------------- user files
#: resolved paths of the files that targets were loaded from: errors raised in them are the user's
_USER_FILES: set[str] = set()


def _deepest_user_frame(tb) -> traceback.FrameSummary | None:
    """The innermost frame of traceback ``tb`` in one of :data:`_USER_FILES`, or None."""
    frames = [f for f in traceback.extract_tb(tb) if os.path.realpath(f.filename) in _USER_FILES]
    return frames[-1] if frames else None


def _one_line(e: BaseException) -> str:
    # Pyro re-raises errors inside a traced model with a table of site shapes appended.
    first = next(iter(str(e).splitlines()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _user_code_error(e: BaseException, path: str | None = None) -> str | None:
    """``file:line: Type: message`` for an exception raised in the user's code (or a SyntaxError
    in ``path``), None when no frame of the traceback is in a user file."""
    if isinstance(e, SyntaxError) and e.filename:
        return f"{e.filename}:{e.lineno}: {type(e).__name__}: {e.msg}"
    frame = _deepest_user_frame(e.__traceback__)
    if frame is None:
        return None
    return f"{frame.filename}:{frame.lineno}: {_one_line(e)}"


def _import_user_file(path: Path, module_name: str):
    """Executes ``path`` as module ``module_name``; an error in it is a one-line CLIError."""
    _USER_FILES.add(os.path.realpath(path))
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - anything raised by the user's file
        raise CLIError(_user_code_error(e) or f"{path}: {_one_line(e)}") from None
    finally:
        sys.path.pop(0)
    return module


def load_target(target: str) -> Callable:
    """Loads ``path/to/file.py:name`` or ``package.module:name``; a dotted ``name`` (``vae.model``)
    is an attribute of an object of the module.

    The target's file is remembered as the user's, so that errors raised in it
    later are reported by its ``file:line`` (see :func:`main`).

    Raises:
        CLIError: a missing file, module or function, or an error raised while
            importing the file (SyntaxError, ImportError, any exception), in one
            line naming ``file:line``.
    """
    if ":" not in target:
        raise CLIError(f"target {target!r} must be 'path/to/file.py:function' or 'package.module:function'")
    where, name = target.rsplit(":", 1)
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise CLIError(f"target file {where!r} does not exist")
        module = _import_user_file(path, f"_pyro_mi_target_{path.stem}")
    else:
        try:
            spec = importlib.util.find_spec(where)
        except ImportError as e:
            raise CLIError(f"cannot import module {where!r}: {e}") from None
        if spec is None:
            raise CLIError(f"cannot import module {where!r}: no module named {where!r}")
        if spec.origin and spec.origin.endswith(".py"):
            _USER_FILES.add(os.path.realpath(spec.origin))
        try:
            module = importlib.import_module(where)
        except Exception as e:  # noqa: BLE001 - anything raised by the user's module
            raise CLIError(f"cannot import module {where!r}: {_user_code_error(e) or _one_line(e)}") from None
    fn = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise CLIError(f"{where!r} has no function {name!r}")
    return fn


# --------------------------------------------------------------------- method options
def _flag_key(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def method_options(method: str) -> dict[str, dataclasses.Field]:
    """The CLI options of ``method``: {option name: its declared field} for each flag of
    :data:`ESTIMATE_OPTIONS` that is an option of the method's declaration or a runtime setting it uses."""
    cls = bound_class(method)
    fields = {**cls.option_fields(), **{f.name: f for f in dataclasses.fields(Runtime) if f.name in cls.RUNTIME}}
    keys = (_flag_key(flag) for flag, _ in ESTIMATE_OPTIONS)
    return {k: fields[k] for k in keys if k in fields}


def _flag_help(flag: str, text: str) -> str:
    """``text`` plus the methods that take ``flag`` and their defaults (from the declarations)."""
    key = _flag_key(flag)
    by_default: dict[str, list[str]] = {}
    for method in METHODS:
        f = method_options(method).get(key)
        if f is not None:
            default = "" if f.default in (None, dataclasses.MISSING) else f": default {f.default}"
            by_default.setdefault(default, []).append(method)
    uses = "; ".join(f"{', '.join(ms)}{d}" for d, ms in by_default.items())
    return f"{text} [{uses}]".replace("%", "%%")


def given_options(method: str, args: argparse.Namespace, flags, takes) -> dict:
    """The option flags given on the command line, by option name, for both subcommands.

    Args:
        flags: the subcommand's option flags (``--max-steps``); ``takes``: the option names ``method`` takes.

    Raises:
        CLIError: a given flag that ``method`` does not take, naming the flags it does take.
    """
    given = {_flag_key(flag): flag for flag in flags if getattr(args, _flag_key(flag)) is not None}
    wrong = [flag for key, flag in given.items() if key not in takes]
    if wrong:
        applies = ", ".join(f for f in flags if _flag_key(f) in takes) or "none"
        verb = "does" if len(wrong) == 1 else "do"
        raise CLIError(f"{', '.join(wrong)} {verb} not apply to --method {method}; its flags are: {applies}")
    return {key: getattr(args, key) for key in given}


def _estimate(args: argparse.Namespace):
    from .examples import get_example, shipped_encoder

    options = given_options(args.method, args, [flag for flag, _ in ESTIMATE_OPTIONS], method_options(args.method))
    if args.timeout is not None and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise CLIError("--timeout applies only under torchrun (several processes)")
    if args.timeout is not None and args.timeout <= 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    distributed.init(args.timeout)  # under torchrun: join the process group
    for key, flag in OUTPUT_FILES.items():
        if key in options:
            check_output_path(options[key], flag)
    for path, flag in ((args.per_point, "--per-point"), (args.plot, "--plot")):
        if path is not None:
            check_output_path(path, flag)
    if args.plot and "record" in bound_class(args.method).RUNTIME:
        options["record"] = True  # the annealing panel draws the recorded chains
    true_mi = None
    if args.example:
        if args.target:
            raise CLIError("give either TARGET or --example, not both")
        ex = get_example(args.example)
        # The example's own encoder (digits-vae's VAE guide) was trained on real data with the
        # ELBO and is a poor proposal for simulated x; the default BA-fitted encoder is used
        # unless --guide names one (tutorials/01_digits_vae_ba_iwae.py compares the two), loaded
        # as shipped unless --fit-steps asks for a fit (benchmarks/fit_example_encoders.py).
        model, obs, true_mi = ex.model, ex.obs_sites, ex.true_mi
    else:
        if not args.target:
            raise CLIError("give a model TARGET (path/to/file.py:function) or --example NAME")
        if not args.obs:
            raise CLIError("--obs is required with a model TARGET (the observed site names)")
        model, obs = load_target(args.target), tuple(args.obs)
    guide = load_target(args.guide) if args.guide else None
    if args.obs and args.example:
        obs = tuple(args.obs)
    if args.example and (args.data or args.model_arg):
        raise CLIError(f"{'--data' if args.data else '--model-arg'} does not apply to --example (a built-in model "
                       "takes no arguments); give a model TARGET")
    if args.proposal == "prior" and (args.guide or args.fit_steps is not None):
        raise CLIError(f"{'--guide' if args.guide else '--fit-steps'} does not apply to --proposal prior (the prior "
                       "is the proposal: no guide is used or fitted)")
    kwargs = _model_args(args.model_arg)
    kwargs.update(_data_arrays(args.data, model, obs) if args.data else {})
    _check_call(model, kwargs, args.target)
    proposal = args.proposal
    if args.example and proposal == "guide" and guide is None and args.fit_steps is None:
        proposal = shipped_encoder(args.example) or proposal  # the default encoder, fitted once and shipped
    result = estimate_mi(
        model,
        obs,
        method=args.method,
        guide=guide,
        proposal=proposal,
        num_data=args.num_data,
        seed=args.seed,
        fit_steps=args.fit_steps,
        model_kwargs=kwargs,
        vectorize=args.vectorize,
        reparam=args.reparam,
        preset=args.preset,
        progress=not args.json and not args.no_progress and sys.stderr.isatty() and distributed.world()[0] == 0,
        **options,
    )
    result.true_mi = true_mi
    if proposal is not args.proposal:
        result.notes.append(f"proposal: {proposal.description}: the encoder that --fit-steps 1000 would fit on this "
                            "model at seed 0; --fit-steps N fits one anew")
    _write_outputs(result, args)
    return result


#: the option that :func:`pyro_mi.plots.sweep` varies for ``--plot``, by method
SWEPT = {**{m: "num_steps" for m in ("ais", "im-ais", "cr-ais", "bdmc")}, "iwae": "num_particles"}


def _write_outputs(result, args: argparse.Namespace) -> None:
    """``--per-point`` and ``--plot`` (a sweep runs on every process under torchrun; rank 0
    writes). A file that cannot be written goes to ``result.write_errors``: the numbers are kept."""
    from . import plots

    sweep = None
    if args.plot and args.method in SWEPT:
        top = result.settings[SWEPT[args.method]]
        sweep = plots.sweep(result, sorted({max(1, top // 100), max(1, top // 10), top}), SWEPT[args.method])
    if distributed.world()[0] != 0:
        return
    for path, write in ((args.per_point, lambda p: result.per_point().to_csv(p)),
                        (args.plot, lambda p: plots.plot(result, p, sweep=sweep))):
        if path is None:
            continue
        try:
            write(path)
        except (OSError, ValueError) as e:
            message = f"{path}: {e}"
            result.write_errors.append(message)
            result.warnings.append(f"{message}: the bounds above are complete, the file is not written")


def _tensor(array, what: str = "an argument") -> torch.Tensor:
    """An array as a tensor: floating and integer values in torch's default float dtype (Pyro's
    distributions take float values, counts included), booleans as they are.

    Raises:
        CLIError: an array of strings, objects or other non-numeric values.
    """
    if getattr(array, "dtype", None) is not None and array.dtype.kind not in "biuf":
        raise CLIError(f"{what}: an array of {array.dtype} values cannot be a model argument (numbers or booleans only)")
    t = torch.as_tensor(array)
    if t.numel() == 0:
        raise CLIError(f"{what}: an empty array (shape {tuple(t.shape)}) cannot be a model argument")
    if t.dtype == torch.bool:
        return t
    out = t.to(torch.get_default_dtype())
    overflow = torch.isinf(out) & torch.isfinite(t.double())
    if bool(overflow.any()):
        raise CLIError(f"{what}: the array's values overflow {out.dtype} (e.g. {float(t[overflow][0]):.3g}, which "
                       f"{out.dtype} cannot hold): rescale them")
    return out


def _parameters(model: Callable) -> list[inspect.Parameter]:
    try:
        return list(inspect.signature(model).parameters.values())
    except (TypeError, ValueError):
        return []


def _data_arrays(specs: list[str], model: Callable, obs: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """``--data``: model arguments by name. ``NAME=FILE`` gives argument NAME; a FILE.npz gives its
    arrays, each named after an argument of the model (or an observed site, passed as a keyword
    named after it); a lone array (FILE.npy) goes to the keyword named after the observed site
    where the model takes one, else to the model's first argument."""
    from .samples import read_arrays

    names = [p.name for p in _parameters(model) if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in _parameters(model))
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        elif not name.isidentifier() or not path:
            raise CLIError(f"--data takes FILE or NAME=FILE (NAME an argument of the model), got {spec!r}")
        arrays = read_arrays(path)
        if name:
            if len(arrays) != 1 and name not in arrays:
                raise CLIError(f"--data {spec}: {path} holds arrays {', '.join(arrays)}; save one array, or one "
                               f"named {name!r}")
            out[name] = _tensor(arrays.get(name, next(iter(arrays.values()))), f"--data {spec}")
            continue
        if "" in arrays:
            if len(obs) == 1 and (obs[0] in names or takes_any):
                out[obs[0]] = _tensor(arrays[""], f"--data {spec}")
            elif names:
                out[names[0]] = _tensor(arrays[""], f"--data {spec}")
            else:
                raise CLIError(f"--data {path} holds one array, and the model takes no argument to give it to")
            continue
        known = [k for k in arrays if k in names or k in obs or takes_any]
        if not known:
            raise CLIError(f"--data {path} has no array named after an argument of the model ({', '.join(names) or 'none'})"
                           f" or an observed site ({', '.join(obs)}); its arrays are: {', '.join(arrays)}")
        out.update({k: _tensor(arrays[k], f"--data {spec} (array {k!r})") for k in known})
    return out


def _model_args(specs: list[str]) -> dict:
    """``--model-arg NAME=FILE|VALUE``: the model's arguments by name (an array of FILE, .npy or
    .npz with one array or one named NAME; or a number)."""
    from .samples import read_arrays

    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier() or not path:
            raise CLIError(f"--model-arg takes NAME=FILE or NAME=NUMBER (NAME a Python identifier), got {spec!r}")
        number = _number(path)
        if number is not None and not os.path.exists(path):
            out[name] = number
            continue
        arrays = read_arrays(path)
        if len(arrays) == 1:
            (array,) = arrays.values()
        elif name in arrays:
            array = arrays[name]
        else:
            raise CLIError(f"--model-arg {spec}: {path} holds arrays {', '.join(arrays)}; save one array, or one "
                           f"named {name!r}")
        out[name] = _tensor(array, f"--model-arg {spec}")
    return out


def _number(text: str) -> int | float | None:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return None


def _check_call(model: Callable, kwargs: dict, target: str | None) -> None:
    """Refuses, by flag, a model argument that is missing or that the model does not take."""
    params = _parameters(model)
    if not params:
        return
    try:
        inspect.signature(model).bind(**kwargs)
    except TypeError as e:
        missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
                   and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if missing:
            raise CLIError(f"the model {target or ''} needs its argument {missing[0]!r}: give it with --data "
                           f"{missing[0]}=FILE (the data: only its shape is used) or --model-arg {missing[0]}=FILE|NUMBER"
                           ) from None
        raise CLIError(f"the model {target or ''} cannot take the arguments given ({e}); its arguments are: "
                       f"{', '.join(p.name for p in params)}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``pyro-mi``."""
    parser = _Parser(prog="pyro-mi", description="Mutual information bounds for Pyro models.")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1, or OMP_NUM_THREADS if set: on "
                                                   "small tensors one thread is as fast and does not thrash a busy "
                                                   "machine; give more for large models)")
    sub = parser.add_subparsers(dest="command", required=True)
    est = sub.add_parser("estimate", help="bound the MI I(x; z) of a Pyro model")
    est.add_argument("target", nargs="?", help="path/to/file.py:function or package.module:function")
    est.add_argument("--example", help="a built-in example: linear-vae, digits-vae or digits-gan")
    est.add_argument("--obs", nargs="+", help="observed site name(s)")
    est.add_argument("--guide", help="guide TARGET q(z|x), called as the model is (the observed values written "
                                    "where the model reads them)")
    est.add_argument("--method", default="iwae", help="bound: " + ", ".join(sorted(METHODS)))
    est.add_argument("--proposal", default="guide", choices=("guide", "prior"))
    est.add_argument("--num-data", type=int, default=NUM_DATA, help=f"simulated data points N (default {NUM_DATA})")
    est.add_argument("--fit-steps", type=int, help="BA fitting steps for the proposal (default encoder: 1000)")
    est.add_argument("--data", metavar="[NAME=]FILE", action="append", default=[],
                     help="the data the model is called with: NAME=FILE gives its argument NAME; a FILE.npz gives "
                          "arrays named after its arguments; a lone array goes to the keyword named after the "
                          "observed site, or to the first argument. Only shapes are used: the observed sites are "
                          "conditioned by name; repeatable")
    est.add_argument("--model-arg", metavar="NAME=FILE|NUMBER", action="append", default=[],
                     help="pass the array in FILE (.npy, or .npz with one array or one named NAME), or a number, to "
                          "the model as its argument NAME (e.g. a design, a count); repeatable")
    est.add_argument("--vectorize", default="auto", choices=("auto", "plate", "vmap", "loop", "fold"),
                     help="how the model is run over a batch: batched in plates, torch.func.vmap over points, or a "
                          "loop (a one-data-point model); plates, or chains folded into its data plate (a model "
                          "with --data); auto takes the first that runs and is checked (default auto)")
    est.add_argument("--preset", default="default", choices=("fast", "default", "tight"),
                     help="K, T and L of the method: fast (a first look), default, tight (what a paper would "
                          "report); flags given explicitly override them")
    est.add_argument("--reparam", default="auto", choices=("auto", "none"),
                     help="auto: non-centre hierarchical location-scale latents (Pyro's LocScaleReparam; the MI is "
                          "unchanged), and let ais run each point centred or non-centred, whichever its fit suits "
                          "(a latent non-centred by hand included); none: the model as written (default auto)")
    est.add_argument("--seed", type=int, default=0)
    est.add_argument("--timeout", type=float,
                     help="under torchrun: seconds a process waits for the others before the run fails "
                          f"(default {distributed.TIMEOUT:g})")
    est.add_argument("--json", action="store_true", help="print one JSON object")
    est.add_argument("--no-progress", action="store_true")
    est.add_argument("--per-point", metavar="FILE.csv",
                     help="write one row per data point (its bounds, gap, ESS, acceptance, divergent or stuck chains "
                          "and warnings; MIResult.per_point) to FILE.csv")
    est.add_argument("--plot", metavar="FILE.png",
                     help="draw the per-point gaps, and for AIS methods the chains' acceptance and step size against "
                          "beta (the chains are recorded) and the sandwich against T (the same points rerun at T/100 "
                          "and T/10; about 11%% more time), for IWAE against K; to FILE (PNG, PDF, SVG by suffix)")
    for flag, kwargs in ESTIMATE_OPTIONS:
        est.add_argument(flag, **{**kwargs, "help": _flag_help(flag, kwargs["help"])})
    est.set_defaults(run=_estimate)
    for extra in SUBCOMMANDS:
        extra(sub)
    return parser


#: functions ``add(subparsers)`` that register further subcommands (with ``set_defaults(run=...)``).
SUBCOMMANDS: list[Callable] = []

from .samples import add_estimate_samples_command  # noqa: E402

SUBCOMMANDS.append(add_estimate_samples_command)


# --------------------------------------------------------------------- output and faults
def strict_json(value: Any) -> str:
    """``value`` as strict JSON: null for NaN and Infinity (``allow_nan=False`` checks it)."""
    return json.dumps(json_safe(value), allow_nan=False)


def _fail(message: str, as_json: bool, usage: str = "") -> int:
    """Prints a one-line error (after ``usage``, without --json) and returns exit status 2."""
    if as_json:
        print(strict_json({"error": message}))
    print(f"{usage}pyro-mi: error: {message}", file=sys.stderr)
    return 2


def _interrupted(e: KeyboardInterrupt, args: argparse.Namespace | None, as_json: bool) -> int:
    """Prints the one line of an interrupted run; returns 143 after SIGTERM, 130 after SIGINT."""
    path = getattr(args, "checkpoint", None)
    method = getattr(args, "method", None) if getattr(args, "command", None) == "estimate" else None
    resumable = [m for m in METHODS if "checkpoint" in method_options(m)]
    if path is not None and os.path.exists(path):
        message = f"interrupted; saved to {path}; rerun the same command to resume"
    elif path is not None:
        message = (f"interrupted before anything was saved to {path} (a phase that is not checkpointed, such as "
                   "fitting the proposal, a critic or AIS's per-point Gaussians, was running); rerunning the command starts afresh")
    elif method in resumable:
        message = "interrupted; nothing saved (pass --checkpoint FILE to make a run resumable)"
    elif method in METHODS:
        message = f"interrupted; nothing saved (--method {method} cannot resume; {', '.join(resumable)} can)"
    else:
        message = "interrupted; nothing saved"
    if as_json:
        print(strict_json({"error": message}))
    print(f"pyro-mi: {message}", file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def _on_sigterm(signum, frame):
    raise Terminated()


def _keep_freed_memory() -> None:
    """Asks glibc to keep freed memory for reuse instead of returning every large block to the
    system: chunked bounds allocate and free tensors of tens of MB per chunk, and with glibc's
    defaults each one is a fresh mmap whose page faults can cost as much as the arithmetic.
    The same as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` in the environment; the
    cost is that the process keeps its peak memory. A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks below 1 GiB come from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap
    except (OSError, AttributeError):
        pass


def _set_threads(threads: int | None) -> None:
    """torch's CPU threads: ``--threads``, else OMP_NUM_THREADS if set, else 1: on small tensors one
    thread is as fast and uses less CPU, and on a busy machine extra threads thrash."""
    if threads is not None:
        if threads < 1:
            raise CLIError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``pyro-mi``; returns the exit status.

    0 on success; 2 on any user error (one line on stderr, and ``{"error": ...}``
    on stdout with ``--json``): bad flags, bad input, an error in the user's model
    file or raised by their model or guide (named by ``file:line``), another process of a
    ``torchrun`` group that died, out of memory; 2 also after printing a result whose requested
    file (``--save-chains``) could not be written; 130 after SIGINT and 143 after SIGTERM (one
    line saying whether a checkpoint was saved). Other exceptions are bugs and keep their
    traceback (under ``--json`` after an ``{"error": ...}`` object on stdout).
    Under ``torchrun`` only rank 0 prints the result.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    as_json, args = "--json" in argv, None
    _keep_freed_memory()
    rank = 0
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave SIGTERM alone
        previous = None
    try:
        args = build_parser().parse_args(argv)
        _set_threads(args.threads)
        if args.command == "estimate" and args.method not in METHODS:
            raise CLIError(f"unknown --method {args.method!r}; choose one of {', '.join(sorted(METHODS))}")
        result = args.run(args)
        rank = distributed.world()[0]
        text = strict_json(result.to_dict()) if args.json else str(result)
    except KeyboardInterrupt as e:
        return _interrupted(e, args, as_json)
    except _UsageError as e:
        return _fail(str(e), as_json, "" if as_json else e.usage)
    except Exception as e:  # noqa: BLE001 - sorted below: the user's errors are one line, bugs re-raise
        message = _user_code_error(e)
        if message is None and isinstance(e, (CLIError, ValueError, TypeError, MemoryError,
                                              distributed.DistributedError)):
            message = str(e)
        if message is None:
            if as_json:  # a bug: the traceback follows on stderr, and stdout still holds one JSON object
                print(strict_json({"error": f"internal error: {_one_line(e)}"}))
            raise
        return _fail(message, as_json)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        distributed.leave()
    if rank == 0:
        print(text)
        for error in getattr(result, "write_errors", []):  # the numbers are printed; the failed write is an error
            print(f"pyro-mi: error: {error}", file=sys.stderr)
    return 2 if getattr(result, "write_errors", []) else 0


def console() -> int:
    """The ``pyro-mi`` console script: :func:`main`, after which the interpreter skips its final
    garbage collection over torch's and Pyro's objects (``gc.freeze``; a few tenths of a second of
    exit time). Nothing of pyro_mi's needs it: the output is printed and every file closed."""
    status = main()
    gc.freeze()
    return status


if __name__ == "__main__":
    sys.exit(console())
