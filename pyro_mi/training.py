"""The shared training loop of the learned-critic MI bounds (GIWAE, InfoNCE, MINE, NWJ, ...).

:func:`train` maximises a stochastic objective over the parameters of some
``torch.nn.Module``s with Adam, shows a tqdm progress bar, evaluates a
validation score every ``eval_every`` steps, keeps the parameters of the best
validation score, stops early after ``patience`` evaluations without
improvement and restores the best parameters at the end.

:func:`split_indices` splits N samples into train / validation / test parts.
A critic bound must be *reported* on samples used neither to fit the critic
nor to choose its stopping step: a bound fitted and evaluated on the same
samples is optimistic (it can exceed the true MI).

Device and dtype follow the data: the loop never moves tensors; callers build
their modules on the data's device. The only host syncs are at validation
steps (one float per evaluation), never per training step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class TrainingLog:
    """What happened in :func:`train`.

    Attributes:
        steps: optimisation steps taken.
        best_step: the step whose parameters were kept (0: the initial ones).
        best_value: the validation score of the kept parameters (nats; None
            without validation).
        stopped_early: whether ``patience`` ran out before ``max_steps``.
        stop_reason: why training ended, in words (patience, ``max_steps``, no training).
        objective: the training objective of every step (nats, higher is better).
        validation: ``(step, score)`` of every validation evaluation.
    """

    steps: int = 0
    best_step: int = 0
    best_value: float | None = None
    stopped_early: bool = False
    stop_reason: str = "max_steps reached"
    objective: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Scalar summary for JSON (no per-step lists)."""
        return {
            "steps": self.steps,
            "best_step": self.best_step,
            "best_value": self.best_value,
            "stopped_early": self.stopped_early,
            "stop_reason": self.stop_reason,
        }


def _check_positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def train(
    modules: Sequence[nn.Module],
    objective: Callable[[int], torch.Tensor],
    *,
    validate: Callable[[], float] | None = None,
    max_steps: int = 2000,
    lr: float = 1e-3,
    eval_every: int = 100,
    patience: int = 5,
    min_delta: float = 0.0,
    max_grad_norm: float | None = None,
    progress: bool = True,
    desc: str = "train",
    module_lrs: Sequence[float | None] | None = None,
    lr_schedule: str = "constant",
    checkpoint=None,
    checkpoint_every: float = 60.0,
) -> TrainingLog:
    """Maximises ``objective`` over the parameters of ``modules`` with Adam and early stopping.

    Args:
        modules: the modules whose parameters are trained (critic, encoder, ...);
            their ``state_dict`` is what early stopping saves and restores.
            Without ``validate``, any object with a ``parameters()`` method will do
            (e.g. a :class:`~pyro_mi.proposal.GuideDensity`).
        objective: ``objective(step) -> scalar tensor`` to *maximise* (a surrogate
            whose gradient is the estimator's gradient, e.g. MINE's corrected one);
            it draws its own minibatch.
        validate: ``validate() -> float``, a score to maximise on held-out samples
            (called under ``torch.no_grad``, modules in eval mode); None trains for
            ``max_steps`` with no early stopping.
        max_steps: maximum number of optimisation steps (0: no training).
        lr: Adam learning rate.
        eval_every: steps between validation evaluations.
        patience: evaluations without improvement before stopping.
        min_delta: an improvement of the validation score by at most this much keeps the new
            parameters but does not renew the patience (a bound saturated at log K stops).
        max_grad_norm: clip the global gradient norm to this value (None: no clipping).
        progress: show a tqdm progress bar.
        desc: the progress bar's label.
        module_lrs: optional per-module learning rates, one per entry of
            ``modules`` (None entries use ``lr``), e.g. a smaller one for a
            pre-fitted encoder trained jointly with a fresh critic.
        lr_schedule: ``"constant"``; ``"cosine"``: learning rates decayed
            to 0 over ``max_steps`` by a cosine (``CosineAnnealingLR``), stepped
            after every optimisation step; or ``"plateau"`` (with ``validate``): halved
            after every ``max(1, patience // 3) + 1`` evaluations without improvement
            (``ReduceLROnPlateau``), so that training slows down before it stops.
        checkpoint: a :class:`~pyro_mi.checkpoint.Checkpoint` (or a section of one):
            the parameters, optimiser, early-stopping state and torch's global RNG
            state are saved every ``checkpoint_every`` seconds, on KeyboardInterrupt
            and at the end; a call with a saved payload resumes it (and one saved at
            the end only restores the parameters), giving the same result as an
            uninterrupted run. The caller releases the checkpoint's lock.

    Returns:
        :class:`TrainingLog`. The modules hold the parameters of the best
        validation score (or the last ones without ``validate``).

    Raises:
        ValueError: non-positive ``eval_every``/``patience``, negative
            ``max_steps``, non-positive ``lr``, an unknown ``lr_schedule``, or a non-finite objective
            (names the step; usually a learning rate that is too large).
    """
    _check_positive_int("max_steps", max_steps, 0)
    _check_positive_int("eval_every", eval_every)
    _check_positive_int("patience", patience)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if lr_schedule not in ("constant", "cosine", "plateau"):
        raise ValueError(f"lr_schedule must be 'constant', 'cosine' or 'plateau', got {lr_schedule!r}")
    if module_lrs is not None and len(module_lrs) != len(modules):
        raise ValueError(f"module_lrs must have one entry per module ({len(modules)}), got {len(module_lrs)}")
    groups, seen = [], set()
    for i, m in enumerate(modules):
        ps = [p for p in m.parameters() if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in ps)
        m_lr = lr if module_lrs is None or module_lrs[i] is None else module_lrs[i]
        if not m_lr > 0:
            raise ValueError(f"module_lrs[{i}] must be > 0, got {m_lr!r}")
        if ps:
            groups.append({"params": ps, "lr": m_lr})
    params = [p for g in groups for p in g["params"]]
    log = TrainingLog()
    if not params or max_steps == 0:
        log.stop_reason = "no training (max_steps = 0 or no trainable parameters)"
        if validate is not None:
            log.best_value = _evaluate(modules, validate)
            log.validation.append((0, log.best_value))
        return log

    opt = torch.optim.Adam(groups, lr=lr)
    sched = None
    if lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max_steps)
    elif lr_schedule == "plateau" and validate is not None:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=max(1, patience // 3))
    run = _Resumable(checkpoint, modules, opt, sched, params[0].device, checkpoint_every)
    stopping = _EarlyStopping(modules, validate, patience, min_delta, eval_every)
    values: list[torch.Tensor] = []
    saved = run.restore()
    if saved is not None:
        if saved["done"]:
            return saved["log"]
        log, stopping.state, values = saved["log"], saved["state"], saved["values"]
    else:
        stopping.start(log)

    def save(done: bool, rng=None) -> None:
        run.save({"done": done, "log": log, "state": stopping.state, "values": values}, rng)

    def evaluate(step: int) -> bool:
        """The checks after an evaluation step; True when early stopping ends the run."""
        recent = float(torch.stack(values[-eval_every:]).mean())
        if not math.isfinite(recent):
            raise ValueError(
                f"{desc}: the training objective became non-finite near step {step}; try a smaller lr or a smaller critic"
            )
        stop = stopping.update(step, log, bar)
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau) and validate is not None:
            score = log.validation[-1][1]
            sched.step(score if math.isfinite(score) else -math.inf)
        return stop

    bar = tqdm(range(log.steps + 1, max_steps + 1), desc=desc, disable=not progress, leave=False,
               initial=log.steps, total=max_steps)
    phase, step_rng = "done", None
    state = stopping.state
    try:
        # A resumed run first finishes the evaluation that the interruption cut short.
        stop = state["pending"] and evaluate(log.steps)
        state["pending"] = False
        log.stopped_early = log.stopped_early or stop
        for step in ([] if stop else bar):
            # phases, so that an interruption saves a consistent state: before the update, the state
            # of the step's start; after it, the state of its end (with its evaluation pending)
            phase, step_rng = "draw", run.rng_state()
            value = objective(step)
            opt.zero_grad(set_to_none=True)
            (-value).backward()
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            phase = "update"
            opt.step()
            if isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR):
                sched.step()
            values.append(value.detach())
            log.steps = step
            phase = "done"
            if step % eval_every == 0 or step == max_steps:
                state["pending"] = True
                stop = evaluate(step)
                state["pending"] = False
                if stop:
                    log.stopped_early = True
                    break
            if run.due():
                save(False)
    except KeyboardInterrupt:
        if phase == "draw":
            save(False, step_rng)
        elif phase == "done":
            save(False)
        # an interruption inside the optimiser's update keeps the last periodic save
        raise
    finally:
        bar.close()
    log.objective = [float(v) for v in torch.stack(values)] if values else []
    if validate is not None:
        for m, s in zip(modules, state["best"]):
            m.load_state_dict(s)
    else:
        log.best_step = log.steps
    save(True)
    return log


class _EarlyStopping:
    """Early stopping on a validation score to maximise: keeps the parameters of the best score (any
    gain), counts the evaluations without a gain above ``min_delta``, and stops after ``patience`` of
    them. Its :attr:`state` (``bad_evals``, ``pending``: an evaluation cut short, ``best``: the kept
    state_dicts) is what a checkpoint saves."""

    def __init__(self, modules, validate, patience: int, min_delta: float, eval_every: int):
        self.modules, self.validate, self.patience, self.min_delta = modules, validate, patience, min_delta
        self.eval_every = eval_every
        self.state = {"bad_evals": 0, "pending": False, "best": None}

    def start(self, log: TrainingLog) -> None:
        """Scores the initial parameters (kept unless training improves on them)."""
        if self.validate is not None:
            self.state["best"] = [copy.deepcopy(m.state_dict()) for m in self.modules]
            log.best_value = _evaluate(self.modules, self.validate)
            log.validation.append((0, log.best_value))

    def update(self, step: int, log: TrainingLog, bar) -> bool:
        """Scores the parameters after ``step``; True when training should stop."""
        if self.validate is None:
            return False
        state = self.state
        score = _evaluate(self.modules, self.validate)
        log.validation.append((step, score))
        bar.set_postfix(val=f"{score:.3f}", best=f"{log.best_value:.3f}")
        if math.isfinite(score) and (not math.isfinite(log.best_value) or score > log.best_value):
            # any gain keeps the parameters; only a gain above min_delta renews the patience
            gain = score - log.best_value if math.isfinite(log.best_value) else math.inf
            state["bad_evals"] = 0 if gain > self.min_delta else state["bad_evals"] + 1
            log.best_value, log.best_step = score, step
            state["best"] = [copy.deepcopy(m.state_dict()) for m in self.modules]
        else:
            state["bad_evals"] += 1
        if state["bad_evals"] >= self.patience:
            better = f"better by over {self.min_delta:g}" if self.min_delta else "better"
            log.stop_reason = (f"patience: no {better} validation score in {self.patience} evaluations "
                               f"({self.patience * self.eval_every} steps) after step {log.best_step}")
            return True
        return False


class _Resumable:
    """What a training run saves to its checkpoint and restores from it: the parameters, the optimiser
    and scheduler, the caller's part (log, early-stopping state, objective values) and torch's RNG state,
    so that a resumed run gives the result of an uninterrupted one."""

    def __init__(self, checkpoint, modules, opt, sched, device: torch.device, every: float):
        self.checkpoint, self.modules, self.opt, self.sched, self.every = checkpoint, modules, opt, sched, every
        self.cuda = device if device.type == "cuda" else None
        self.last = time.monotonic()

    def rng_state(self):
        """torch's global RNG state (and the parameters' CUDA device's)."""
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    def restore(self) -> dict | None:
        """Loads a saved run into the modules, the RNG and (unless it finished) the optimiser and scheduler;
        returns its payload, or None when there is none."""
        saved = self.checkpoint.payload if self.checkpoint is not None else None
        if saved is None:
            return None
        for m, s in zip(self.modules, saved["modules"]):
            m.load_state_dict(s)
        # the random stream continues from where the saved run was, finished or not
        torch.set_rng_state(saved["rng"][0])
        if self.cuda is not None:
            torch.cuda.set_rng_state(saved["rng"][1], self.cuda)
        if not saved["done"]:
            self.opt.load_state_dict(saved["optimizer"])
            if self.sched is not None:
                self.sched.load_state_dict(saved["scheduler"])
        return saved

    def due(self) -> bool:
        """Whether ``checkpoint_every`` seconds have passed since the last save (False without a checkpoint)."""
        return self.checkpoint is not None and time.monotonic() - self.last >= self.every

    def save(self, part: dict, rng=None) -> None:
        """Saves the run with the caller's ``part`` (and ``rng``, else the RNG state now)."""
        if self.checkpoint is None:
            return
        self.checkpoint.save({
            **part, "modules": [m.state_dict() for m in self.modules], "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else None, "rng": rng or self.rng_state(),
        })
        self.last = time.monotonic()


def _evaluate(modules: Sequence[nn.Module], validate: Callable[[], float]) -> float:
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad():
            return float(validate())
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


def split_indices(
    num_samples: int,
    val_fraction: float,
    test_fraction: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    min_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomly splits ``range(num_samples)`` into train, validation and test indices.

    Args:
        num_samples: N.
        val_fraction, test_fraction: fractions of N for validation (early stopping)
            and test (the reported bound); each in [0, 1), summing to < 1. A zero
            fraction gives an empty part.
        generator: torch generator for the permutation (reproducible splits).
        device: device of the returned index tensors.
        min_size: the smallest allowed non-empty part (and training part).

    Returns:
        ``(train, val, test)`` index tensors (int64).

    Raises:
        ValueError: fractions out of range, or a part smaller than ``min_size``
            (the message says how many samples are needed).
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not (isinstance(f, (int, float)) and 0 <= f < 1):
            raise ValueError(f"{name} must be in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    n_val = int(round(num_samples * val_fraction))
    n_test = int(round(num_samples * test_fraction))
    n_train = num_samples - n_val - n_test
    for name, size, frac in (("validation", n_val, val_fraction), ("test", n_test, test_fraction)):
        if frac > 0 and size < min_size:
            need = math.ceil(min_size / frac)
            raise ValueError(
                f"too few samples for the {name} split: {num_samples} samples x {name} fraction {frac} "
                f"gives {size} {name} samples, need at least {min_size} (at least {need} samples in all)"
            )
    if n_train < min_size:
        raise ValueError(
            f"too few samples: {num_samples} samples leave {n_train} for training after the "
            f"validation/test splits, need at least {min_size}"
        )
    perm = torch.randperm(num_samples, generator=generator).to(device)
    return perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :]
