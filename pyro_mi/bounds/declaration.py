"""A bound, declared once: what it computes, as a small frozen configuration object.

Each bound family declares its options as a dataclass in its own module (:class:`BA` and
:class:`IWAE` in :mod:`pyro_mi.bounds.importance`, :class:`AIS` in :mod:`pyro_mi.bounds.ais`,
:class:`GIWAE` and :class:`InfoNCE` in :mod:`pyro_mi.bounds.giwae`, :class:`MineAIS` in
:mod:`pyro_mi.bounds.mine_ais`); the declaration
validates them when it is made, documents them in its own docstring, reports them in a result's
``settings`` and gives the command line its flags (the fields with :func:`~pyro_mi.runtime.cli`
metadata). How a run executes (seed, checkpoint, progress, blocks, chunks, compile) is a
:class:`~pyro_mi.runtime.Runtime`, never a bound's option.

Method strings (``"iwae"``, ``"ais"``, ``"cr-ais"`` ...) are shorthands, the command line's
``--method``: :func:`declare` turns a method string and flat options into a declaration and a
runtime, and refuses an option the method does not take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ..runtime import RUNTIME_FIELDS, Runtime, check_positive_int, cli

#: the command-line flags of options that several bounds share
NUM_PARTICLES_FLAG = cli("K, importance samples or negatives per data point", type=int)
MAX_STEPS_FLAG = cli("critic training steps", type=int)
BATCH_SIZE_FLAG = cli("simulated pairs per training step", type=int)
LR_FLAG = cli("critic/encoder Adam learning rate", type=float)


@dataclass(frozen=True)
class Bound:
    """Base of the bound declarations: ``bound.run(density, proposal, x, z, runtime)`` evaluates it.

    Subclasses set :attr:`RUNTIME` (the :class:`~pyro_mi.runtime.Runtime` settings they use) and
    implement :meth:`run`; their fields are their options.
    """

    #: the Runtime settings this bound uses; any other is refused
    RUNTIME: ClassVar[frozenset] = frozenset({"progress"})

    @property
    def name(self) -> str:
        """The method name: ``estimate_mi``'s ``method`` and the command line's ``--method``."""
        raise NotImplementedError

    def run(self, density, proposal, x, z, runtime: Runtime = Runtime()):
        """Evaluates the bound on the simulated pairs (x, z) of ``density`` with ``proposal``.

        Args:
            density: the model's :class:`~pyro_mi.density.ModelDensity`.
            proposal: q(z|x) (:mod:`pyro_mi.proposal`).
            x: simulated observations ``{site: (N, ...)}``.
            z: the packed latents (N, D) that generated x.
            runtime: how the run executes (only the settings in :attr:`RUNTIME` may differ from
                their defaults).

        Returns:
            :class:`~pyro_mi.result.MIResult` (nats).
        """
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The declaration's options as flat keyword arguments of :func:`declare` (a nested
        declaration's options flattened into them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def option_fields(cls) -> dict[str, dataclasses.Field]:
        """{option name: its dataclass field} of the flat options :meth:`from_options` takes."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def from_options(cls, **options) -> "Bound":
        """The declaration from flat options (see :meth:`options`)."""
        return cls(**options)

    def replace(self, **changes) -> "Bound":
        """A copy with ``changes`` (validated as a new declaration)."""
        return dataclasses.replace(self, **changes)


def split_options(name: str, cls: type[Bound], options: dict) -> tuple[dict, dict]:
    """Splits flat ``options`` into the bound's own and the runtime's.

    Raises:
        ValueError: an option that is neither the method's nor a runtime setting it uses.
    """
    own = cls.option_fields()
    unknown = [k for k in options if k not in own and k not in cls.RUNTIME]
    if unknown:
        why = " (a runtime setting it does not use)" if unknown[0] in RUNTIME_FIELDS else ""
        raise ValueError(f"method {name!r} takes no option {unknown[0]!r}{why}")
    return ({k: v for k, v in options.items() if k in own}, {k: v for k, v in options.items() if k not in own})


__all__ = ["BATCH_SIZE_FLAG", "Bound", "LR_FLAG", "MAX_STEPS_FLAG", "NUM_PARTICLES_FLAG", "check_positive_int",
           "split_options"]
