"""MI-aware SVI losses: subclasses of :class:`pyro.infer.ELBO` for :class:`pyro.infer.SVI`.

* :class:`Trace_MIM`: the Mutual Information Machine loss, MIM and A-MIM
  (Livne et al. 2019, eq. 8, 12, Alg. 1-2), in ``trace_mim.py``.
* :class:`TraceMI_ELBO`: the ELBO minus λ times a critic's ξ-bound on I(x; z)
  (VAE-MINE appendix eq. 2-10), in ``mi_elbo.py``.
"""

from .mi_elbo import TraceMI_ELBO, xi_bound
from .trace_mim import Trace_MIM

__all__ = ["TraceMI_ELBO", "Trace_MIM", "xi_bound"]
