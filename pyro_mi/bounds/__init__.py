"""MI bounds, one module per family (Brekelmans et al. 2022).

:data:`METHODS` maps each method name of ``estimate_mi`` / ``pyro-mi estimate`` to
its bound function ``fn(density, proposal, x, z, *, progress, **options) -> MIResult``.
"""

from .importance import ba_bounds, iwae_bounds

METHODS = {
    "ba": ba_bounds,
    "iwae": iwae_bounds,
}

__all__ = ["METHODS", "ba_bounds", "iwae_bounds"]
