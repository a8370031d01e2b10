"""Samplers: a vectorised HMC kernel, annealing schedules and AIS chains.

This layer knows only a components function over flat tensors,
``components(z (C, N, D)) -> (log pi0(z), log gamma(z))`` (each (C, N)), never
sites, supports or plates (see ``DESIGN.md``).
"""

from .annealing import AnnealingState, anneal, record_steps, set_rng_state
from .hmc import HMCInfo, HMCState, TARGET_ACCEPT, evaluate, init, initial_step_size, mix, step
from .schedules import SCHEDULES, get_schedule, linear_schedule, sigmoid_schedule

__all__ = [
    "AnnealingState",
    "HMCInfo",
    "HMCState",
    "SCHEDULES",
    "TARGET_ACCEPT",
    "anneal",
    "evaluate",
    "get_schedule",
    "init",
    "initial_step_size",
    "linear_schedule",
    "mix",
    "record_steps",
    "set_rng_state",
    "sigmoid_schedule",
    "step",
]
