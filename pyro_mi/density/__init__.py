"""The density layer: a Pyro model as batched tensor functions of (x, z).

`ModelDensity` reads log p(z), log p(x|z) and simulated (x, z) pairs from Pyro
traces; `GuideDensity` reads log q(z|x) and reparameterised samples from a Pyro
guide. Every latent site is packed into one flat vector per data point in
unconstrained space (``biject_to(support).inv``, Pyro's transforms), and the
log-Jacobian of that change of variables is added to each density, so that
importance weights p(x, z) / q(z|x) are unchanged and samplers see only flat
tensors of shape ``(..., num_data, latent_dim)``.

Two ways of writing a model are accepted:

* a model for **one data point** (no data plate; observed sites sample when
  not conditioned): pyro_mi adds a data plate and a chains plate itself;
* a model with a **data plate** that takes the observed values as keyword
  arguments named after the observed sites (``def model(x): with
  pyro.plate("data", x.shape[0]): ...``): pass ``data=`` (observed values of
  that shape, used as the template) and pyro_mi adds only a chains plate to the
  left of the model's plates.

Every batch dim of size > 1 inside the model must be declared by a
``pyro.plate``: pyro_mi bounds one model (one design) at a time, and the dims
right of the data dim are summed into one data point.

Observed data travel as a dict ``{site: tensor of shape (num_data, *shape)}``.

Modules, by job: :mod:`.normal` (the fast Normal log density),
:mod:`.packing` (latent sites <-> one flat unconstrained vector, with the
log-Jacobian), :mod:`.plates` (pyro_mi's chains and data plates, tracing inside
them), :mod:`.model` (:class:`ModelDensity`), :mod:`.guide_trace` (a guide's run in the model's
batch layout, :meth:`ModelDensity.trace_guide`). The guide as a proposal is in :mod:`pyro_mi.proposal`.
"""

from .model import Data, ModelDensity
from .normal import site_log_prob
from .packing import LatentSite

__all__ = ["Data", "LatentSite", "ModelDensity", "site_log_prob"]
