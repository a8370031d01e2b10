"""Samplers: a vectorised HMC kernel, step-size tuning, annealing schedules and AIS chains.

This layer knows only a components function over flat tensors,
``components(z (C, N, D)) -> (log pi0(z), log gamma(z))`` (each (C, N)), never
sites, supports or plates (see ``DESIGN.md``); :mod:`.compile` records it (with the
kernel's transition) as a graph, once per shape.
"""

from . import hmc
from .ais import AISState, StepInfo, anneal
from .compile import COMPILE_MODES, Compiled, compile_components
from .hmc import HMCInfo, HMCState
from .schedules import SCHEDULES, get_schedule, linear_schedule, sigmoid_schedule
from .step_size import (TARGET_ACCEPT, OnlineAdapter, PilotAdapter, StepSizeAdapter, freeze, pilot_step_sizes,
                        search_step_size)

__all__ = [
    "AISState",
    "COMPILE_MODES",
    "Compiled",
    "HMCInfo",
    "HMCState",
    "SCHEDULES",
    "StepInfo",
    "OnlineAdapter",
    "PilotAdapter",
    "StepSizeAdapter",
    "TARGET_ACCEPT",
    "anneal",
    "compile_components",
    "freeze",
    "get_schedule",
    "hmc",
    "linear_schedule",
    "pilot_step_sizes",
    "search_step_size",
    "sigmoid_schedule",
]
