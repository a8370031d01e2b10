"""MI lower bounds from paired samples only: :func:`estimate_mi_samples` and ``pyro-mi estimate-samples``.

For users with no model density at all — only n paired samples (x_i, z_i) —
this fits a critic with one of the dual bounds of :mod:`pyro_mi.bounds.dual`
(MINE, MINE-f, NWJ, InfoNCE, the ξ-bound) and reports the bound on held-out
samples with its standard error.

A bound fitted and evaluated on the same samples is optimistic: with enough
steps a critic memorises the training pairs and the "bound" can exceed the true
MI. The number reported here is therefore computed on a test split that played
no part in training or early stopping.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .bounds.dual import DUAL_METHODS, DualBound
from .result import MIResult

__all__ = ["as_sample_tensors", "estimate_mi_samples", "load_npz"]


def _as_tensor(a: Any, name: str) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    else:
        try:
            arr = np.asarray(a)
        except Exception as e:  # noqa: BLE001 - any conversion failure is the user's input
            raise TypeError(f"{name} must be an array or tensor, got {type(a).__name__}") from e
        if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
            raise TypeError(f"{name} must hold numbers, got an array of dtype {arr.dtype}")
        t = torch.from_numpy(np.array(arr, order="C"))  # np.array keeps a 0-d array 0-d
    if t.is_complex():
        raise TypeError(f"{name} must be real-valued, got dtype {t.dtype}")
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    elif not isinstance(a, torch.Tensor):
        # numpy float64 -> the default float dtype: critics train in float32
        t = t.to(torch.get_default_dtype())
    return t


def as_sample_tensors(x: Any, z: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Validates paired samples and returns them as float tensors (n, dx), (n, dz).

    Accepts numpy arrays, tensors or nested lists. The first dimension indexes
    samples; a 1-D array is taken as one feature (n,) -> (n, 1); further dims
    are flattened into features. Tensors keep their dtype and device (z is moved
    to x's); numpy arrays become the default float dtype.

    Raises:
        TypeError: non-numeric or complex input.
        ValueError: a 0-d array, empty arrays, different numbers of samples,
            NaN or infinite values (with the count and the first bad row).
    """
    xt, zt = _as_tensor(x, "x"), _as_tensor(z, "z")
    out = []
    for name, t in (("x", xt), ("z", zt)):
        if t.dim() == 0:
            raise ValueError(f"{name} is a scalar; give an array of samples of shape (n,) or (n, features)")
        if t.dim() == 1:
            t = t.unsqueeze(1)  # one feature per sample
        elif t.dim() > 2:
            t = t.reshape(t.shape[0], -1)
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
        out.append(t)
    xt, zt = out
    if xt.shape[0] != zt.shape[0]:
        raise ValueError(
            f"x and z must have the same number of samples (first dimension): "
            f"x has {xt.shape[0]}, z has {zt.shape[0]}"
        )
    zt = zt.to(device=xt.device, dtype=xt.dtype)
    for name, t in (("x", xt), ("z", zt)):
        bad = ~torch.isfinite(t)
        if bad.any():
            rows = bad.any(1).nonzero().flatten()
            kind = "NaN" if torch.isnan(t).any() else "infinite"
            raise ValueError(
                f"{name} has {int(bad.sum())} {kind} or non-finite value(s) in {rows.numel()} sample(s), "
                f"first at sample {int(rows[0])}; remove or impute them"
            )
    return xt, zt


def estimate_mi_samples(
    x: Any,
    z: Any,
    method: str = "mine",
    *,
    bound: DualBound | None = None,
    seed: int | None = 0,
    progress: bool = True,
    **options,
) -> MIResult:
    """A lower bound on I(x; z) in nats from paired samples, reported on held-out samples.

    Args:
        x, z: paired samples, arrays or tensors with the same first dimension n
            (see :func:`as_sample_tensors`: 1-D means one feature).
        method: ``"mine"`` (Donsker–Varadhan with the moving-average gradient,
            Belghazi et al. 2018), ``"mine-f"``, ``"nwj"``, ``"infonce"`` or ``"xi"``
            (the ξ-bound, ξ fixed with ``xi=...`` or optimised).
        bound: the bound declared (:class:`~pyro_mi.bounds.dual.DualBound`), instead of ``method``
            and ``options``.
        seed: seeds torch for the split, the critic's initialisation and the
            minibatches (None leaves the RNG alone).
        progress: show a progress bar.
        **options: the fields of :class:`~pyro_mi.bounds.dual.DualBound`:
            ``max_steps`` (5000), ``batch_size`` (256), ``lr`` (1e-3),
            ``negatives`` ("shuffle" | "all"), ``xi``, ``critic`` (a module, "auto", "joint" or
            "separable"), ``hidden_sizes``, ``preprocess`` ("robust", "standardize",
            "gaussianize", "none"), ``val_fraction`` (0.2; InfoNCE 0.1), ``test_fraction``
            (0.2; InfoNCE 0.4),
            ``patience`` (20 epochs), ``lr_schedule`` ("plateau"), ...

    Returns:
        :class:`~pyro_mi.result.MIResult` with ``lower`` ± ``lower_stderr`` on the
        test split (``num_data`` = test size), ``settings["num_samples"]`` = n,
        ``seconds`` and ``warnings`` (list of str) set. With ``test_fraction=0`` the
        bound is evaluated on the training samples and is optimistic (a warning says so).

    Raises:
        ValueError / TypeError: bad input (see :func:`as_sample_tensors`), an
            unknown method, too few samples for the validation/test splits, or
            fewer than :data:`~pyro_mi.bounds.dual.MIN_TEST_SAMPLES` (100) test
            samples: with the default test fraction 0.2, n must be at least 500 (250 for InfoNCE).
    """
    if bound is None:
        bound = DualBound(method, **options)
    elif not isinstance(bound, DualBound) or method != "mine" or options:
        raise ValueError("give the bound declared (bound=DualBound(...)) or by method and options, not both")
    start = time.perf_counter()
    xt, zt = as_sample_tensors(x, z)
    if seed is not None:
        torch.manual_seed(seed)
    result = bound.fit(xt, zt, progress=progress)
    result.settings["seed"] = seed
    result.seconds = time.perf_counter() - start
    return result


def read_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` file by name, or the one array of an ``.npy`` file under the key ``""``.

    Raises:
        ValueError: a missing or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file {str(path)!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read {str(path)!r} as a .npz or .npy file: {e}") from e
    return {k: data[k] for k in data.files} if hasattr(data, "files") else {"": data}


def load_npz(path: str | Path, x_key: str = "x", z_key: str = "z") -> tuple[np.ndarray, np.ndarray]:
    """Reads arrays ``x_key`` and ``z_key`` from an ``.npz`` file.

    Raises:
        ValueError: missing file, unreadable file, or a missing key (the message
            lists the keys the file has).
    """
    arrays = read_arrays(path)
    if "" in arrays:
        raise ValueError(f"{str(path)!r} holds one array; save x and z together with numpy.savez(path, x=..., z=...)")
    for key, flag in ((x_key, "--x-key"), (z_key, "--z-key")):
        if key not in arrays:
            raise ValueError(f"{str(path)!r} has no array {key!r} ({flag}); its arrays are: {', '.join(arrays)}")
    return arrays[x_key], arrays[z_key]


def _run_estimate_samples(args: argparse.Namespace) -> MIResult:
    x, z = load_npz(args.file, args.x_key, args.z_key)
    from .cli import given_options

    flags = ["--" + name.replace("_", "-") for name in _FLAGS]
    options = given_options(args.method, args, flags, DualBound.options_of(args.method))
    result = estimate_mi_samples(
        x, z, args.method, seed=args.seed,
        progress=not args.json and not args.no_progress and sys.stderr.isatty(), **options,
    )
    return _SamplesResult(result)


class _SamplesResult:
    """The CLI's view of an MIResult: JSON with method, lower, lower_stderr, seconds, num_samples."""

    def __init__(self, result: MIResult):
        self.result = result

    def to_dict(self) -> dict:
        r = self.result
        out = {
            "method": r.method,
            "lower": r.lower,
            "lower_stderr": r.lower_stderr,
            "seconds": r.seconds,
            "num_samples": r.settings["num_samples"],
            "num_test": r.settings["num_test"],
            "evaluated_on": r.settings["evaluated_on"],
            "warnings": list(r.warnings),
        }
        out.update({k: v for k, v in r.settings.items() if k not in out and isinstance(v, (int, float, str, bool))})
        out["critics_tried"] = dict(r.settings["critics_tried"])  # validation bound of each candidate
        return out

    def __str__(self) -> str:
        r = self.result
        tried = r.settings["critics_tried"]
        where = (
            f"on {r.settings['num_test']} held-out samples" if r.settings["num_test"]
            else "on the training samples: optimistic"
        )
        rows = [
            f"method        {r.method}",
            f"lower (nats)  {r.lower:9.3f} ± {r.lower_stderr:.3f}   ({where})",
            f"num_samples   {r.settings['num_samples']:9d}",
            f"steps         {r.settings['steps']:9d}   ({r.settings['stop_reason']})",
            f"critic        {r.settings['critic']:>9}   (" + ", ".join(
                "validation n/a" if v is None else f"validation {v:.3f}" if len(tried) == 1 else f"{k} {v:.3f}"
                for k, v in tried.items()) + ")",
            f"seconds       {r.seconds:9.2f}",
        ]
        if r.method == "infonce":
            rows.insert(2, f"log K         {math.log(r.settings['num_negatives']):9.3f}   (InfoNCE cannot exceed it)")
        if r.method == "xi":
            rows.insert(2, f"xi            {r.settings['xi']:9.4f}")
        rows += [f"WARNING: {w}" for w in r.warnings]
        return "\n".join(rows)


#: the flags of ``estimate-samples``: the fields of :class:`DualBound` with command-line metadata
_FLAGS = {f.name: f for f in dataclasses.fields(DualBound) if "cli" in f.metadata}


def add_estimate_samples_command(subparsers) -> None:
    """Registers ``pyro-mi estimate-samples FILE.npz ...`` (see :mod:`pyro_mi.cli`)."""
    p = subparsers.add_parser(
        "estimate-samples",
        help="lower-bound I(x; z) from paired samples in a .npz file (MINE, MINE-f, NWJ, InfoNCE, xi)",
        description="Fits a critic on a training split and reports the bound on a held-out test split "
        "(a bound evaluated on the samples it was fitted to is optimistic).",
    )
    p.add_argument("file", help="a .npz file with two arrays of paired samples (same first dimension)")
    p.add_argument("--x-key", default="x", help="name of the x array in the file (default x)")
    p.add_argument("--z-key", default="z", help="name of the z array in the file (default z)")
    p.add_argument("--method", default="mine", choices=DUAL_METHODS)
    for name, f in _FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), **f.metadata["cli"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run_estimate_samples)
