"""pyro_mi: tight mutual-information bounds for Pyro models.

Reads log p(z), log p(x|z) and a guide's log q(z|x) from Pyro traces and returns
lower and upper bounds on I(x; z) in nats (Brekelmans et al. 2022).
"""

from .bounds import AIS, BA, GIWAE, IWAE, METHODS, InfoNCE, MineAIS
from .bounds.dual import DualBound
from .density import ModelDensity
from .oed import EIGResult, eig
from .estimate import estimate_mi, make_proposal
from .infer import TraceMI_ELBO, Trace_MIM
from .plots import plot, sweep
from .proposal import GaussianEncoder, GuideDensity, PriorProposal, fit_guide
from .result import MIResult
from .runtime import Runtime
from .samples import estimate_mi_samples

__all__ = [
    "AIS",
    "BA",
    "DualBound",
    "EIGResult",
    "GIWAE",
    "IWAE",
    "InfoNCE",
    "MineAIS",
    "Runtime",
    "METHODS",
    "GaussianEncoder",
    "GuideDensity",
    "MIResult",
    "ModelDensity",
    "PriorProposal",
    "TraceMI_ELBO",
    "Trace_MIM",
    "eig",
    "estimate_mi",
    "estimate_mi_samples",
    "fit_guide",
    "make_proposal",
    "plot",
    "sweep",
]
__version__ = "0.1.0"
