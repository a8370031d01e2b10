"""MI bounds, one module per family (Brekelmans et al. 2022).

:data:`METHODS` maps each method name of ``estimate_mi`` / ``pyro-mi estimate`` to
its bound function ``fn(density, proposal, x, z, *, progress, **options) -> MIResult``.

``giwae`` trains its own q_θ jointly with a critic: it starts from a copy of the
passed proposal when that is a GaussianEncoder (the caller's is unchanged) and
keeps any other proposal fixed; ``infonce`` ignores the proposal and uses the prior.
``mine-ais`` uses the proposal as its base q_θ in the same way; ``ibal_bounds`` evaluates
the IBAL of a given (q, critic), e.g. GIWAE's or a fitted :class:`LikelihoodCritic`, and is not
a method of ``estimate_mi``.
"""

from .giwae import giwae_bounds, infonce_bounds
from .ais import ais_bounds, bdmc_bounds, cr_ais_bounds, im_ais_bounds
from .importance import ba_bounds, iwae_bounds
from .likelihood_critic import LikelihoodCritic, fit_likelihood_critic
from .mine_ais import ibal_bounds, mine_ais_bounds

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

__all__ = ["METHODS", "ba_bounds", "giwae_bounds", "infonce_bounds", "iwae_bounds"]
__all__ += ["ibal_bounds", "mine_ais_bounds", "LikelihoodCritic", "fit_likelihood_critic"]
__all__ += ["ais_bounds", "bdmc_bounds", "cr_ais_bounds", "im_ais_bounds"]
