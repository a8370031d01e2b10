"""MI bounds, one module per family (Brekelmans et al. 2022), each declared once.

A bound is a declaration (:mod:`.declaration`): :class:`BA`, :class:`IWAE`, :class:`AIS`
(``estimator="im"|"cr"|"bdmc"``), :class:`GIWAE`, :class:`InfoNCE`, :class:`MineAIS`; its
``run(density, proposal, x, z, runtime)`` evaluates it, how the run executes being a
:class:`~pyro_mi.runtime.Runtime`. :data:`BOUNDS` maps each method name of ``estimate_mi`` and
``pyro-mi estimate`` to its declaration, and :func:`declare` builds one from flat options;
:data:`METHODS` maps the same names to shorthand functions
``fn(density, proposal, x, z, **options) -> MIResult`` that take the options and runtime settings by
name.

``giwae`` trains its own q_θ jointly with a critic: it starts from a copy of the
passed proposal when that is a GaussianEncoder (the caller's is unchanged) and
keeps any other proposal fixed; ``infonce`` ignores the proposal and uses the prior.
``mine-ais`` uses the proposal as its base q_θ in the same way; ``ibal_bounds`` evaluates
the IBAL of a given (q, critic), e.g. GIWAE's or a fitted :class:`LikelihoodCritic`, and is not
a method of ``estimate_mi``.
"""

from __future__ import annotations

import functools

from ..runtime import Runtime
from .declaration import Bound, split_options
from .giwae import GIWAE, InfoNCE, giwae_bounds, infonce_bounds
from .ais import AIS, ais_bounds, bdmc_bounds, cr_ais_bounds, im_ais_bounds
from .importance import BA, IWAE, ba_bounds, iwae_bounds
from .likelihood_critic import LikelihoodCritic, fit_likelihood_critic
from .mine_ais import MineAIS, ibal_bounds, mine_ais_bounds

#: method name -> its declaration (a class, or a class with its estimator fixed)
BOUNDS = {
    "ba": BA,
    "iwae": IWAE,
    "ais": AIS,
    "im-ais": AIS,
    "cr-ais": functools.partial(AIS, estimator="cr"),
    "bdmc": functools.partial(AIS, estimator="bdmc"),
    "giwae": GIWAE,
    "infonce": InfoNCE,
    "mine-ais": MineAIS,
}

#: method name -> its shorthand function ``fn(density, proposal, x, z, **options)``
METHODS = {
    "ba": ba_bounds,
    "iwae": iwae_bounds,
    "ais": ais_bounds,
    "im-ais": im_ais_bounds,
    "cr-ais": cr_ais_bounds,
    "bdmc": bdmc_bounds,
    "giwae": giwae_bounds,
    "infonce": infonce_bounds,
    "mine-ais": mine_ais_bounds,
}


def bound_class(method: str) -> type[Bound]:
    """The declaration class of ``method``.

    Raises:
        ValueError: an unknown method, naming the known ones.
    """
    if method not in BOUNDS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(BOUNDS)}")
    b = BOUNDS[method]
    return b.func if isinstance(b, functools.partial) else b


def declare(method: str, options: dict) -> tuple[Bound, Runtime]:
    """The declaration of ``method`` from flat ``options`` and the runtime their runtime settings give.

    Args:
        method: a key of :data:`BOUNDS`.
        options: the method's options (:meth:`Bound.option_fields`) and the
            :class:`~pyro_mi.runtime.Runtime` settings it uses (``Bound.RUNTIME``), by name.

    Raises:
        ValueError: an unknown method, an option it does not take, and every error of the
            declaration's and the runtime's checks (naming the option).
    """
    cls = bound_class(method)
    own, runtime = split_options(method, cls, options)
    b = BOUNDS[method]
    fixed = b.keywords if isinstance(b, functools.partial) else {}
    for key in fixed.keys() & own.keys():
        if own[key] != fixed[key]:
            raise ValueError(f"method {method!r} is {key}={fixed[key]!r}, not {key}={own[key]!r}")
    return cls.from_options(**{**own, **fixed}), Runtime(**runtime)


def run_method(method: str, density, proposal, x, z, args: tuple, options: dict):
    """``declare(method, options)`` run on (x, z): the body of the shorthand functions of :data:`METHODS`,
    whose positional ``args`` after (density, proposal, x, z) are the declaration's first options in
    order (``iwae_bounds(d, q, x, z, 1000)``: K; ``ais_bounds(d, q, x, z, K, T, L, step_size, schedule)``).

    Raises:
        TypeError: more positional options than the declaration has, or one also given by name.
    """
    names = list(bound_class(method).option_fields())
    if len(args) > len(names):
        raise TypeError(f"{METHODS[method].__name__}() takes at most {len(names)} positional options, got {len(args)}")
    for name, value in zip(names, args):
        if name in options:
            raise TypeError(f"{METHODS[method].__name__}() got multiple values for option {name!r}")
        options = {**options, name: value}
    bound, runtime = declare(method, options)
    return bound.run(density, proposal, x, z, runtime)


__all__ = ["AIS", "BA", "BOUNDS", "Bound", "GIWAE", "IWAE", "InfoNCE", "METHODS", "MineAIS", "bound_class", "declare",
           "run_method"]
__all__ += ["ba_bounds", "giwae_bounds", "infonce_bounds", "iwae_bounds"]
__all__ += ["ibal_bounds", "mine_ais_bounds", "LikelihoodCritic", "fit_likelihood_critic"]
__all__ += ["ais_bounds", "bdmc_bounds", "cr_ais_bounds", "im_ais_bounds"]
