"""How a run executes, apart from what it computes.

A bound's declaration (:mod:`pyro_mi.bounds.declaration`: ``IWAE(num_particles=...)``,
``AIS(num_chains=..., num_steps=...)``) says *what* is computed; a :class:`Runtime` says *how*
the run goes: its random numbers, the blocks of points that ``torchrun``'s processes share out,
the chunks of chains, the checkpoint it resumes from, the progress bar, the chain record and
how HMC evaluates the model. No runtime setting changes a number (bit for bit, but
``compile="inductor"``, equal to rounding), so a checkpoint, a record or a progress bar never
appears among a bound's options, and each bound declares which runtime settings it uses
(``Bound.RUNTIME``): a setting that does not apply to a bound is an error.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .distributed import block_seed, check_points_per_block, seeded_global_rng
from .samplers import anneal, hmc
from .samplers.compile import COMPILE_MODES


def cli(help: str, **argparse) -> dict:
    """Field metadata that makes a declaration's field a command-line flag (``--name-with-dashes``)
    with this help text and these ``argparse.add_argument`` keywords."""
    return {"cli": dict(argparse, help=help)}


def check_positive_int(name: str, value, optional: bool = False) -> None:
    """Raises ValueError naming ``name`` unless ``value`` is a positive integer (or None if ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Runtime:
    """How a bound's run executes (none of these changes its numbers).

    Attributes:
        generator: the ``torch.Generator`` the run's seed is drawn from (None: torch's global
            generator, one draw); chunks, blocks and the pilot get generators of their own.
        checkpoint: file to save progress to every ``checkpoint_every`` seconds and on
            KeyboardInterrupt; the same call resumes from it (and deletes it when done). Refused if
            another process holds it or a different run wrote it.
        checkpoint_every: seconds between checkpoint saves (0: after every step).
        save_chains: write the chains as ArviZ InferenceData to this ``.nc`` file (checked for
            writability before the run; implies ``record``).
        record: keep per-step chain statistics and thinned states (for ``MIResult.to_arviz``); off by
            default so that memory stays flat in T.
        max_chains_per_chunk: run the chains in sequential chunks of at most this many (None: as
            many as keep a chunk under ``CHUNK_ELEMENTS`` numbers).
        callback: ``callback(key, AISState, StepInfo)`` after every annealing step.
        progress: show progress bars.
        compile: how the HMC kernels evaluate the densities (:mod:`pyro_mi.samplers.compile`):
            ``"none"`` (a Pyro trace per leapfrog step), ``"trace"`` (a graph recorded once and checked
            against the eager densities), ``"inductor"`` (that graph compiled by ``torch.compile``;
            CUDA graphs on CUDA), or ``"auto"``: ``"trace"`` when T x L >= 100, where its one-off
            cost (a few eager evaluations) pays. The numbers are the same (bit for bit with ``"trace"``,
            to rounding with ``"inductor"``).
        points_per_block: the points are run in blocks of this many, each with random numbers of its
            own (:mod:`pyro_mi.distributed`); under ``torchrun`` the ranks share the blocks out, and the
            numbers are the same for any number of processes. None: the bound's default.

    Raises:
        ValueError: a negative ``checkpoint_every``, a non-positive ``points_per_block`` or ``max_chains_per_chunk``, an unknown
            ``compile`` mode.
    """

    generator: torch.Generator | None = None
    checkpoint: str | None = field(default=None, metadata=cli(
        "save progress (AIS chains, MINE-AIS training) to FILE; rerunning the command resumes it", metavar="FILE"))
    checkpoint_every: float = 60.0
    save_chains: str | None = field(default=None, metadata=cli(
        "write the AIS chains as ArviZ InferenceData (netCDF)", metavar="FILE.nc"))
    record: bool = False
    max_chains_per_chunk: int | None = None
    callback: Callable | None = None
    progress: bool = True
    compile: str = field(default="auto", metadata=cli(
        "how HMC evaluates the model: none (a Pyro trace per leapfrog step), trace (one recorded graph, same "
        "numbers), inductor (torch.compile; CUDA graphs on GPU), auto (trace when --num-steps x --num-leapfrog "
        ">= 100)", choices=("auto",) + COMPILE_MODES))
    points_per_block: int | None = field(default=None, metadata=cli(
        "data points per block: the unit that torchrun's processes share out, each with random numbers of its own "
        "(default 1024; ba and iwae: as many as one chunk of log weights holds, at least 1024)", type=int))

    def __post_init__(self):
        if self.compile not in ("auto",) + COMPILE_MODES:
            raise ValueError(f"compile must be 'auto' or one of {COMPILE_MODES}, got {self.compile!r}")
        if self.points_per_block is not None:
            check_points_per_block(self.points_per_block)
        if not isinstance(self.checkpoint_every, (int, float)) or not self.checkpoint_every >= 0:
            raise ValueError(f"checkpoint_every must be a number of seconds >= 0, got {self.checkpoint_every!r}")
        check_positive_int("max_chains_per_chunk", self.max_chains_per_chunk, optional=True)

    def replace(self, **changes) -> "Runtime":
        """A copy with ``changes`` (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


#: the names of the runtime settings
RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(Runtime))



class ChainRunner:
    """Runs a block's annealing jobs in chunks, resumable, with observers: the execution of the AIS
    chains, apart from which chains a bound runs (:func:`pyro_mi.bounds.ais.run_chains`).

    A job is a list of chains, forward ones from draws of pi0 and reverse ones from given starts; it
    runs in sequential chunks of at most ``max_chains_per_chunk`` chains, each with a generator of its
    own seeded from (``seed``, job, chunk) (and pi0's draws from another), so a run is reproducible
    and a resumed run equals the uninterrupted one. Every annealing step is passed to the
    ``observers`` (``observer(key, state, info)``, ``key = (job, chunk, block)``). With a
    ``checkpoint`` (a part of the run's :class:`~pyro_mi.checkpoint.Checkpoint`), the finished chunks,
    the state of the running one and the observers' ``data`` of this ``block`` are saved every
    ``checkpoint_every`` seconds, on KeyboardInterrupt (``with runner:``) and at the end; a runner on
    the same checkpoint resumes where it stopped. :attr:`payload` also keeps what the caller stores
    in it (the frozen step sizes), so that it is not recomputed on resume.
    """

    def __init__(self, components: Callable, draw_pi0: Callable, z: torch.Tensor, betas: torch.Tensor,
                 num_leapfrog: int, *, seed: int, max_chains_per_chunk: int, checkpoint=None,
                 checkpoint_every: float = 60.0, observers: tuple = (), block: int = 0, posterior_draws: int = 0):
        self.components, self.draw_pi0, self.z, self.betas = components, draw_pi0, z, betas
        self.num_leapfrog, self.seed, self.chunk = num_leapfrog, seed, max_chains_per_chunk
        self.checkpoint, self.checkpoint_every, self.block = checkpoint, checkpoint_every, block
        self.observers, self.posterior_draws = tuple(observers), posterior_draws
        self.payload = (checkpoint.payload if checkpoint is not None else None) or {"completed": {}, "current": None}
        for i, obs in enumerate(self.observers):
            if hasattr(obs, "data") and "observers" in self.payload:
                obs.data.update(self.payload["observers"][i] or {})
        self._last_save = time.monotonic()

    def save(self) -> None:
        """Saves the payload (and the observers' data of this block) to the checkpoint."""
        payload = self.payload
        payload["observers"] = [{k: v for k, v in o.data.items() if k[-1] == self.block} if hasattr(o, "data") else None
                                for o in self.observers]
        current = payload["current"]
        payload["progress"] = (bool(payload.get("done")), len(payload["completed"]),
                               current[1].step if current is not None else -1)
        self.checkpoint.save(payload)
        self._last_save = time.monotonic()

    def generator(self, *key) -> torch.Generator:
        """A generator seeded from (seed, ``key``), on z's device."""
        return torch.Generator(device=self.z.device).manual_seed(block_seed(self.seed, *key))

    def draw(self, n: int, *key) -> torch.Tensor:
        """``n`` draws of pi0 (n, N, D) from torch's global RNG seeded from (seed, ``key``, "pi0")."""
        with torch.no_grad(), seeded_global_rng(block_seed(self.seed, *key, "pi0"), self.z.device):
            return self.draw_pi0(n)

    def job(self, name: str, inits: list, step_sizes, adapter=None, extra: tuple = ()) -> list[dict]:
        """Runs (or takes from the checkpoint) the chunks of job ``name``.

        Args:
            inits: ``[(kind, start (N, D) or None, count)]``, kind ``"fwd"`` (from pi0) or ``"rev"``.
            step_sizes, adapter: as :func:`~pyro_mi.samplers.ais.anneal`.
            extra: observers of this job only.

        Returns:
            one dict per chunk: ``log_weights`` (C, N), ``reverse`` (C,) flags, ``first_forward`` (the
            final state of its first forward chain, or None) and, with ``posterior_draws``, ``posterior``.
        """
        z, payload = self.z, self.payload
        N, D = z.shape
        flat = [(kind, start) for kind, start, count in inits for _ in range(count)]
        outs = []
        for c, lo in enumerate(range(0, len(flat), self.chunk)):
            key = (name, c, self.block)
            if key in payload["completed"]:
                outs.append(payload["completed"][key])
                continue
            part = flat[lo : lo + self.chunk]
            reverse = torch.tensor([kind == "rev" for kind, _ in part], device=z.device)
            current = payload["current"]
            if current is not None and current[0] == key:
                state, z_init = current[1], current[1].hmc.z
                gen = torch.Generator(device=z.device)
                gen.set_state(current[2])
            else:
                state, gen = None, self.generator(name, c)
                n_fwd = int((~reverse).sum())
                z_f = self.draw(n_fwd, name, c) if n_fwd else z.new_zeros(0, N, D)
                z_r = [start.unsqueeze(0) for kind, start in part if kind == "rev"]
                z_init = torch.cat([z_f] + z_r, 0)  # ``flat`` lists a job's forward chains first
            out = self._chunk(key, z_init, reverse, step_sizes, adapter, state, gen, extra)
            payload["completed"][key] = out
            payload["current"] = None
            outs.append(out)
        return outs

    def _chunk(self, key, z_init, reverse, step_sizes, adapter, state, gen, extra) -> dict:
        def on_step(st, info):
            self.payload["current"] = (key, st, gen.get_state())
            for obs in extra + self.observers:
                obs(key, st, info)
            if self.checkpoint is not None and time.monotonic() - self._last_save >= self.checkpoint_every:
                self.save()

        with torch.no_grad():
            final = anneal(self.components, z_init, reverse, self.betas, step_sizes, self.num_leapfrog, gen,
                           adapter=adapter, state=state, on_step=on_step)
        fwd_idx = (~reverse).nonzero()
        out = {"log_weights": final.log_weights, "reverse": reverse,
               "first_forward": final.hmc.z[int(fwd_idx[0])] if fwd_idx.numel() else None}
        if self.posterior_draws and fwd_idx.numel():
            out["posterior"] = posterior_draws(self.components, final, ~reverse, self.posterior_draws,
                                               self.num_leapfrog, gen)
        return out

    def __enter__(self) -> "ChainRunner":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        """Saves on KeyboardInterrupt, releases the checkpoint on any error, marks it done otherwise."""
        if self.checkpoint is None:
            return False
        if kind is not None:
            if issubclass(kind, KeyboardInterrupt):
                self.save()
            self.checkpoint.release()
            return False
        self.payload["done"] = True
        try:
            self.save()
        except ValueError:  # the disk filled at the end: the results are in hand, the file keeps its last save
            pass
        return False


def posterior_draws(components: Callable, final, forward: torch.Tensor, num_draws: int, num_leapfrog: int,
                    generator: torch.Generator) -> dict:
    """``num_draws`` HMC transitions at beta = 1 of the ``forward`` chains of a finished chunk (``final``,
    an AISState), at the step size each used last: ``{"z": (M, C_fwd, N, D), "accept_prob", "diverging",
    "step_size": (M, C_fwd, N)}``. The chains' weights are final; the draws serve diagnostics only."""
    state = hmc.HMCState(*(t[forward] for t in final.hmc))
    eps = final.step_size[forward]
    zs, accept, diverging = [], [], []
    with torch.no_grad():
        for _ in range(num_draws):
            state, info = hmc.step(state, components, 1.0, eps, num_leapfrog, generator)
            zs.append(state.z)
            accept.append(info.accept_prob)
            diverging.append(info.diverging)
    return {"z": torch.stack(zs), "accept_prob": torch.stack(accept), "diverging": torch.stack(diverging),
            "step_size": eps.expand(num_draws, *eps.shape).clone()}


__all__ = ["RUNTIME_FIELDS", "ChainRunner", "Runtime", "check_positive_int", "cli", "posterior_draws"]
