"""The Mutual Information Machine loss, MIM and A-MIM, as a Pyro ELBO.

Livne, Swersky & Fleet (2019), "MIM: Mutual Information Machine" (the paper in
``shared/papers/livne2019_mutual_information_machine.txt``). Equation numbers
below refer to it.

With the anchors P(x) (the data) and P(z) (the model's prior), the encoder
q_θ(z|x) (the Pyro guide) and the decoder p_θ(x|z) (the model's likelihood),
MIM samples (x, z) from the mixture M_S = ½ (q_θ(z|x) P(x) + p_θ(x|z) P(z))
(eq. 4) and minimises the average of two cross-entropies (eq. 8)::

    L_MIM = ½ ( CE(M_S, q_θ(x, z)) + CE(M_S, p_θ(x, z)) )
          = -½ E_{M_S} [ log q_θ(z|x) + log q_θ(x) + log p_θ(x|z) + log p_θ(z) ]

with p_θ(z) = P(z) and q_θ(x) = E_{p_θ(z')}[p_θ(x|z')] the decoder's marginal
(eq. 16, sec. 4.2), estimated by importance sampling with the guide (Alg. 2)::

    log q_θ(x) ≈ log (1/K) Σ_k p_θ(x|z'_k) p_θ(z'_k) / q_θ(z'_k|x),   z'_k ~ q_θ(z'|x).

In the encoding half (x from the data, z ~ q_θ(z|x)) the (x, z) sample's own z serves as
the draw (K = 1), as Alg. 2 line 3 collects the terms: log q_θ(z|x) + log q̂_θ(x) is then
log p_θ(x, z) in value. A separate z' ~ q_θ(z'|x) would give the same expectation and the
same expected gradient (both draws have the law q_θ(z|x)), with more variance and at the cost
of one more encoder and decoder pass. In the decoding half z̃ comes from the prior, so the
z' of q̂(x̃) is a fresh draw from q_θ(z'|x̃) (Alg. 2 line 4); with K > 1, all K are fresh.

Alg. 1 draws half of the N samples of a batch from each half of M_S. Where every site is in
one data plate (a VAE), so does :class:`Trace_MIM`: at random, half the points of the batch are
decoding samples (x̃_n generated in x_n's place) and half encoding samples, all in one run of the
guide and the model; else each half runs on the whole batch.

A-MIM (eq. 12-13, ``asymmetric=True``) samples from the encoding distribution
M_S^q = q_θ(z|x) P(x) only.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan

from ..density.arguments import ModelArguments, locate_observed
from ..density.plates import sample_sites
from ..weights import log_mean_exp

__all__ = ["Trace_MIM"]

_MARGINAL_PLATE = "_pyro_mi_mim_marginal"


class _Half(NamedTuple):
    """The traces of one half of the MIM mixture (encoding or decoding samples).

    ``model_trace``/``guide_trace`` hold log p_θ(x, z) and log q_θ(z|x) at the (x, z)
    sample; ``marginal_model_trace``/``marginal_guide_trace`` hold the z' ~ q_θ(z'|x)
    draws (K of them in a plate when ``marginal_particles > 1``) of the importance-sampled
    log q_θ(x): the same traces in the encoding half with K = 1.
    """

    model_trace: poutine.Trace
    guide_trace: poutine.Trace
    marginal_model_trace: poutine.Trace
    marginal_guide_trace: poutine.Trace


class _Split(NamedTuple):
    """One particle of MIM as Alg. 1 draws it: each point of the batch (along the data plate, batch
    dim ``dim``) is an encoding sample (x_n, z'_n ~ q(z|x_n)) or, where ``decoding`` (a bool tensor
    of the plate's size) is true, a decoding sample (z̃_n ~ p(z), x̃_n ~ p(x|z̃_n) in x_n's place).

    ``generated`` is the model run under :func:`~pyro.poutine.uncondition` (log p(x̃, z̃));
    ``guide_trace`` the guide at the mixed batch, replayed at z̃ (log q(z̃|x̃)); ``draw`` the
    guide's z' at the mixed batch (log q(z'|x)); ``model_trace`` the model replayed at z'
    (log p(x, z')). Rows of a trace that its points do not use are ignored.
    """

    generated: poutine.Trace
    guide_trace: poutine.Trace
    draw: poutine.Trace
    model_trace: poutine.Trace
    decoding: torch.Tensor
    dim: int


class _MIMTraces(NamedTuple):
    """One particle: the encoding half and the decoding halves (none for A-MIM), or, where Alg. 1's
    split applies, the split particles alone."""

    encoding: Optional[_Half]
    decoding: tuple
    splits: tuple = ()

    def traces(self):
        """Every poutine trace the particle holds."""
        halves = ((self.encoding,) if self.encoding is not None else ()) + self.decoding
        yield from (t for part in halves + self.splits for t in part if isinstance(t, poutine.Trace))


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class Trace_MIM(ELBO):
    """MIM / A-MIM loss for :class:`pyro.infer.SVI` (Livne et al. 2019, eq. 8, 12; Alg. 1-2).

    A drop-in replacement for :class:`~pyro.infer.Trace_ELBO`: the usual VAE model
    (a data plate, the observed tensor passed as an argument, ``obs=x`` or an
    expression such as ``obs=x.reshape(-1, 784)``) and guide are used unchanged::

        svi = SVI(model, guide, Adam({"lr": 1e-3}), loss=pyro_mi.Trace_MIM())
        svi.step(x)

    Per particle, with the data x of the batch (sums over the data plate, as
    :class:`~pyro.infer.Trace_ELBO` sums; nats)::

        L_enc = -Σ_n [ ½ (log q(z_n|x_n) + log q̂(x_n)) + β (log p(x_n|z_n) + log p(z_n)) ]
                with z_n ~ q(z|x_n)                               (encoding samples)
        L_dec = the same at x̃_n ~ p(x|z̃_n), z̃_n ~ p(z)         (decoding samples)
        loss  = ½ (L_enc + L_dec)      (MIM, eq. 8 and Alg. 2, M_S an equal mixture)
        loss  = L_enc                  (A-MIM, eq. 12: encoding samples only)

    where log q̂(x) is the K-sample importance estimate of the decoder marginal
    log q_θ(x) with z' ~ q(z'|x) (Alg. 2; a lower bound on log q_θ(x) in
    expectation, so the loss is an upper bound on eq. 8): in the encoding half with K = 1
    the sample's own z_n (Alg. 2 line 3; then L_enc = -(½ + β) Σ_n log p(x_n, z_n)),
    else fresh draws; and β is the warm-up
    weight. Decoding samples come from the model run under
    :func:`pyro.poutine.uncondition`; the guide then scores the prior's z̃ at x̃
    (log q(z̃|x̃), Alg. 2 line 5) and draws the z' of q̂(x̃).

    **Alg. 1's split.** For MIM with K = 1, where every site of the model and guide is in one
    data plate of B ≥ 2 points (not subsampled), the halves share the batch as Alg. 1 draws
    them: ⌊B/2⌋ points chosen at random are decoding samples (x̃_n written where the model reads
    x_n), the others encoding samples, and one run of the guide and one of the model at that
    mixed batch serve both (a guide with one sample site also draws z' from the distribution it
    builds to score z̃): three runs of the model or guide per particle (four for a guide with
    several sample sites) instead of six. Each point's share of L_enc or L_dec is weighted
    B / (2 · the size of its half), so the loss has the expectation above. Otherwise (K > 1, sites outside the data plate, a subsampled plate)
    each half runs on the whole batch.

    **Discrete likelihoods.** An observed site without ``rsample`` (Bernoulli pixels) is sampled
    in the decoding half without a gradient path; its gradient takes the score-function term
    Σ_n (c_n - b_n) ∇ log p(x̃_n|z̃_n) (App. D.2), c_n data point n's share of the half's loss and
    b_n the mean of the others' (a baseline), as Pyro's own ELBOs do for non-reparameterisable
    sites. Latent sites must be reparameterisable.

    **Warm-up** (sec. 5, after Alemi et al. 2017): β, the weight of the second,
    decoder cross-entropy term CE(M_S, p_θ(x, z)) = -E[log p_θ(x|z) + log p_θ(z)]
    of eq. 8, rises linearly from 0 to ½ over ``warmup_steps`` training steps
    (β = ½ min(1, t / warmup_steps) at step t; ½ throughout when
    ``warmup_steps=0``). The first term, ½ CE(M_S, q_θ(x, z)), keeps weight ½.
    A step is one call of :meth:`loss_and_grads` (one ``svi.step``) or of
    :meth:`differentiable_loss`; :meth:`loss` does not advance it. ``num_steps``
    can be set to resume.

    Args:
        num_particles: number of (encoding, decoding) sample sets averaged.
        max_plate_nesting: as for :class:`~pyro.infer.ELBO` (guessed if omitted).
        vectorize_particles: draw the particles in one vectorised pass
            (Pyro's outermost particle plate). The encoding half (all of A-MIM) is
            fully vectorised; the decoding half re-encodes data sets generated by
            the model, which a guide written as ``guide(x)`` takes one at a time,
            so it loops over particles.
        asymmetric: A-MIM (eq. 12-13) instead of MIM.
        marginal_particles: K, the number of z' draws in the importance estimate
            of log q_θ(x) (Alg. 2 uses K = 1). With K > 1 the log-mean-exp is
            taken per element of the plates shared by every site (the data plate:
            q_θ(x) factorises over it), and every site must carry the same
            ``poutine.scale``.
        warmup_steps: length of the linear warm-up of β (see above).
        strict_enumeration_warning, ignore_jit_warnings, retain_graph: as for
            :class:`~pyro.infer.ELBO`.

    The errors below are raised at the first loss evaluation, not at construction.

    Raises:
        ValueError: the model has no observed site; the guide does not sample a
            latent site of the model, or samples a site that is not one (named);
            a guide site (or, for MIM, a latent site of the model) is not
            reparameterisable (App. D.2); for MIM with a discrete likelihood, sites
            outside the data plate; for MIM, an observed site's value that is
            computed from the model's arguments rather than read from them (a
            reshape or a slice of an argument is found, and the decoding half
            writes its generated data there); sites with different scales when K > 1.
    """

    def __init__(
        self,
        num_particles: int = 1,
        max_plate_nesting: float = float("inf"),
        vectorize_particles: bool = False,
        asymmetric: bool = False,
        marginal_particles: int = 1,
        warmup_steps: int = 0,
        strict_enumeration_warning: bool = True,
        ignore_jit_warnings: bool = False,
        retain_graph: Optional[bool] = None,
    ):
        _check_int("num_particles", num_particles, 1)
        self.marginal_particles = _check_int("marginal_particles", marginal_particles, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if not isinstance(asymmetric, bool):
            raise TypeError(f"asymmetric must be a bool, got {type(asymmetric).__name__}")
        self.asymmetric = asymmetric
        self.num_steps = 0
        self._observed_slots: dict = {}  # where a model reads each observed site, by argument shapes
        self._data_plates: dict = {}  # Alg. 1's split: the data plate's (dim, size), by model, guide, shapes
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=vectorize_particles,
            strict_enumeration_warning=strict_enumeration_warning,
            ignore_jit_warnings=ignore_jit_warnings,
            retain_graph=retain_graph,
        )

    # ------------------------------------------------------------------ weights
    @property
    def warmup_weight(self) -> float:
        """β, the current weight of the decoder cross-entropy term (0 → ½ over ``warmup_steps``)."""
        if self.warmup_steps == 0:
            return 0.5
        return 0.5 * min(1.0, self.num_steps / self.warmup_steps)

    # ------------------------------------------------------------------- traces
    def _get_trace(self, model, guide, args, kwargs):
        """One particle: the traces of the encoding half and, for MIM, the decoding half."""
        self._ensure_plate_nesting(model, guide, args, kwargs)
        plate = self._data_plate(model, guide, args, kwargs)
        if plate is not None:
            return _MIMTraces(None, (), (self._split(model, guide, args, kwargs, *plate),))
        encoding = self._encoding_half(model, guide, args, kwargs)
        decoding = () if self.asymmetric else (self._decoding_half(model, guide, args, kwargs),)
        return _MIMTraces(encoding, decoding)

    def _get_vectorized_trace(self, model, guide, args, kwargs):
        """All particles at once: the encoding half in Pyro's particle plate; the
        decoding half (or Alg. 1's split) once per particle (its guide takes one generated data set)."""
        self._ensure_plate_nesting(model, guide, args, kwargs)
        plate = self._data_plate(model, guide, args, kwargs)
        if plate is not None:
            return _MIMTraces(None, (), tuple(self._split(model, guide, args, kwargs, *plate)
                                              for _ in range(self.num_particles)))
        encoding = self._encoding_half(
            self._vectorized_num_particles(model), self._vectorized_num_particles(guide), args, kwargs
        )
        decoding = ()
        if not self.asymmetric:
            decoding = tuple(self._decoding_half(model, guide, args, kwargs) for _ in range(self.num_particles))
        return _MIMTraces(encoding, decoding)

    def _ensure_plate_nesting(self, model, guide, args, kwargs):
        # The K-sample marginal needs a free batch dim left of the model's plates.
        # The guess runs the model and guide once; fork the RNG so that it draws nothing
        # from the user's random stream (a seed then reproduces the same loss).
        if self.marginal_particles > 1 and self.max_plate_nesting == float("inf"):
            with torch.random.fork_rng(devices=[]):
                self._guess_max_plate_nesting(model, guide, args, kwargs)

    def _encoding_half(self, model, guide, args, kwargs) -> _Half:
        # (x, z) ~ P(x) q(z|x): z from the guide at the data, the model replayed on it.
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = _replayed(model, guide_trace, args, kwargs)
        guide_trace = prune_subsample_sites(guide_trace)
        _check_event_shapes(model_trace, guide_trace)
        self._check_traces(model_trace, guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        if self.marginal_particles == 1:  # Alg. 2: the encoding sample's own z estimates log q(x)
            return _Half(model_trace, guide_trace, model_trace, guide_trace)
        marginal = self._marginal_traces(model, guide, args, kwargs)
        return _Half(model_trace, guide_trace, *marginal)

    def _decoding_half(self, model, guide, args, kwargs) -> _Half:
        # (x, z) ~ p(x|z) P(z): the model with its observed sites sampled (reparameterised).
        model_trace = _generated(model, args, kwargs)
        _check_generated(model_trace)
        dec_args, dec_kwargs = self._substitute_data(model, model_trace, args, kwargs)
        # log q(z|x̃) of the prior's z at the generated x̃ (Alg. 2 line 5): replay the guide.
        guide_trace = poutine.trace(poutine.replay(guide, trace=model_trace), graph_type="flat").get_trace(
            *dec_args, **dec_kwargs
        )
        guide_trace = prune_subsample_sites(guide_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        marginal = self._marginal_traces(model, guide, dec_args, dec_kwargs)
        return _Half(model_trace, guide_trace, *marginal)

    def _data_plate(self, model, guide, args, kwargs):
        """``(dim, size)`` of the plate that holds every sample site of the model and the guide, where
        Alg. 1's split applies (MIM, K = 1, one such plate, not subsampled, of size ≥ 2), else None.
        Found once per model, guide and argument shapes, from a run of each that draws nothing from
        the user's random stream (a model or guide that fails there, a guide that does not sample the
        model's latent sites or data of another shape than the model generates run both halves,
        which name the failure)."""
        if self.asymmetric or self.marginal_particles > 1:
            return None
        key = (model, guide, tuple((slot, tuple(v.shape)) for slot, v in ModelArguments(args, kwargs).tensor_slots()))
        if key not in self._data_plates:
            try:
                with torch.random.fork_rng(devices=[]):
                    generated = _generated(model, args, kwargs)
                    guide_trace = poutine.trace(poutine.replay(guide, trace=generated), graph_type="flat").get_trace(
                        *args, **kwargs)
                latents = {s["name"] for s in sample_sites(generated) if not s["infer"].get("was_observed")}
                matched = latents == {s["name"] for s in sample_sites(guide_trace)} and all(
                    s["value"].shape == s["infer"]["obs"].shape
                    for s in sample_sites(generated) if s["infer"].get("was_observed"))
                self._data_plates[key] = (_common_plate(sample_sites(generated) + sample_sites(guide_trace))
                                          if matched else None)
            except Exception:
                self._data_plates[key] = None
        return self._data_plates[key]

    def _split(self, model, guide, args, kwargs, dim: int, size: int) -> _Split:
        # Alg. 1: ⌊B/2⌋ points at random are decoding samples, the rest encoding samples.
        generated = _generated(model, args, kwargs)
        decoding = torch.zeros(size, dtype=torch.bool)
        decoding[torch.randperm(size)[: size // 2]] = True
        decoding = decoding.to(next(iter(sample_sites(generated)))["value"].device)
        mixed_args, mixed_kwargs = self._substitute_data(model, generated, args, kwargs, rows=(dim, decoding))
        # log q(z̃|x̃) (Alg. 2 line 5) at every point; only the decoding points use it.
        guide_trace = prune_subsample_sites(poutine.trace(poutine.replay(guide, trace=generated), graph_type="flat")
                                            .get_trace(*mixed_args, **mixed_kwargs))
        _check_reparameterised(guide_trace)
        _check_generated(generated)
        draw = _draw(guide, guide_trace, mixed_args, mixed_kwargs)
        _check_event_shapes(generated, draw)
        model_trace = _replayed(model, draw, mixed_args, mixed_kwargs)
        self._check_traces(model_trace, draw)
        for trace in (generated, guide_trace, draw, model_trace):
            trace.compute_log_prob()
        return _Split(generated, guide_trace, draw, model_trace, decoding, dim)

    def _substitute_data(self, model, model_trace, args, kwargs, rows=None):
        """The model's arguments with each observed site's data replaced by the values the model
        generated there, written where the model reads them: the argument itself when the site
        observes it (``obs=x``), else the argument's elements the site's value is made of (``obs=
        x.reshape(-1, 784)``, a slice), found once per argument shapes by
        :func:`~pyro_mi.density.arguments.locate_observed` (Pyro's ``uncondition`` keeps the
        observed value in ``site["infer"]["obs"]``). With ``rows = (dim, mask)`` only the points of
        the data plate (batch dim ``dim``) where ``mask`` is true take the generated values."""
        arguments = ModelArguments(args, kwargs)
        values: dict = {}
        for site in sample_sites(model_trace):
            if not site["infer"].get("was_observed"):
                continue
            name, obs, value = site["name"], site["infer"]["obs"], site["value"]
            if value.shape != obs.shape:
                raise ValueError(
                    f"Trace_MIM: observed site {name!r} generates values of shape {tuple(value.shape)} "
                    f"but its data have shape {tuple(obs.shape)}; the likelihood's batch shape must match "
                    "the data (use .to_event() for the event dims)"
                )
            if rows is not None:
                dim, mask = rows
                value = torch.where(mask.reshape((-1,) + (1,) * (site["fn"].event_dim - dim - 1)), value, obs)
            same = [slot for slot, a in arguments.slots() if a is obs]
            if same:
                values.update({slot: value for slot in same})
                continue
            where, whole = self._observed_slot(model, arguments, name)
            base = values.get(where.slot, arguments.get(where.slot))
            if whole:  # obs=x.reshape(...): the argument is the value, reshaped
                values[where.slot] = value.reshape(base.shape).to(base.dtype)
                continue
            flat = base.reshape(-1).index_put((where.index.reshape(-1).to(base.device),),
                                              value.reshape(-1).to(base.dtype))
            values[where.slot] = flat.reshape(base.shape)
        return arguments.replaced(values)

    def _observed_slot(self, model, arguments: ModelArguments, name: str):
        key = (model, name, tuple((slot, tuple(v.shape)) for slot, v in arguments.tensor_slots()))
        if key not in self._observed_slots:
            located, _ = locate_observed(model, arguments, [name])
            where = located.get(name)
            # whole: the value's elements are the argument's, in order (a reshape of it)
            whole = where is not None and where.index.numel() == arguments.get(where.slot).numel() and bool(
                (where.index.reshape(-1).cpu() == torch.arange(where.index.numel())).all())
            self._observed_slots[key] = where, whole
        where, whole = self._observed_slots[key]
        if where is None:
            raise ValueError(
                f"Trace_MIM: the observed value of site {name!r} is computed from the model's arguments (not "
                "a rearrangement of one argument's elements, such as a reshape or a slice); symmetric MIM "
                "re-runs the guide on data generated by the model and must write them where the model reads "
                "its data; observe the data themselves, or use Trace_MIM(asymmetric=True)"
            )
        return where, whole

    def _marginal_traces(self, model, guide, args, kwargs):
        # Fresh z' ~ q(z'|x) for the importance estimate of log q_θ(x) (Alg. 2).
        K = self.marginal_particles
        if K > 1:
            plate = pyro.plate(_MARGINAL_PLATE, K, dim=-(self.max_plate_nesting + 1))
            model, guide = plate(model), plate(guide)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(
            *args, **kwargs
        )
        guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        return model_trace, guide_trace

    @staticmethod
    def _check_traces(model_trace, guide_trace):
        model_sites = sample_sites(model_trace)
        observed = [s["name"] for s in model_sites if s["is_observed"]]
        if not observed:
            raise ValueError(
                "Trace_MIM: the model has no observed sites; MIM needs data, passed to the model and "
                "observed with pyro.sample(name, dist, obs=x)"
            )
        latents = [s["name"] for s in model_sites if not s["is_observed"]]
        guide_names = [s["name"] for s in sample_sites(guide_trace)]
        for name in latents:
            if name not in guide_names:
                raise ValueError(f"Trace_MIM: the guide does not sample latent site {name!r} of the model")
        for name in guide_names:
            if name not in latents:
                raise ValueError(
                    f"Trace_MIM: the guide samples site {name!r}, which is not a latent site of the model "
                    f"(latent sites: {latents}, observed: {observed})"
                )
        _check_reparameterised(guide_trace)

    # --------------------------------------------------------------- estimators
    def _log_marginal(self, model_trace, guide_trace) -> torch.Tensor:
        """Σ over data of log q̂(x) = log (1/K) Σ_k p(x, z'_k) / q(z'_k|x) (Alg. 2), a scalar."""
        model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)
        if self.marginal_particles == 1:
            return sum(s["log_prob_sum"] for s in model_sites) - sum(s["log_prob_sum"] for s in guide_sites)
        ndim = self.max_plate_nesting + 1
        sites = model_sites + guide_sites
        # q_θ(x) factorises over the plates that every site is in (the data plate).
        stacks = [{(f.name, f.dim) for f in s["cond_indep_stack"] if f.vectorized} for s in sites]
        common = set.intersection(*stacks)
        keep = {dim for _, dim in common}
        scale = sites[0]["scale"]
        for s in sites[1:]:
            if not _same_scale(s["scale"], scale):
                raise ValueError(
                    f"Trace_MIM(marginal_particles>1): site {s['name']!r} has scale {s['scale']!r} but site "
                    f"{sites[0]['name']!r} has {scale!r}; the K-sample log q(x) needs one poutine.scale for "
                    "all sites"
                )
        log_w = 0.0
        for sign, group in ((1.0, model_sites), (-1.0, guide_sites)):
            for s in group:
                lp = scale_and_mask(s["unscaled_log_prob"], mask=s["mask"])
                log_w = log_w + sign * _sum_except(lp, keep, ndim)
        log_qx = log_mean_exp(log_w, -ndim)
        return scale_and_mask(log_qx.sum(), scale)

    def _half_loss(self, half: _Half) -> torch.Tensor:
        """-[½ (log q(z|x) + log q̂(x)) + β log p(x, z)], summed over the batch (nats), plus a
        score-function term of zero value where the half sampled x without reparameterisation."""
        log_q = sum(s["log_prob_sum"] for s in sample_sites(half.guide_trace))
        log_p = sum(s["log_prob_sum"] for s in sample_sites(half.model_trace))
        log_qx = self._log_marginal(half.marginal_model_trace, half.marginal_guide_trace)
        loss = -(0.5 * (log_q + log_qx) + self.warmup_weight * log_p)
        scored = _scored(half.model_trace)
        return loss + self._half_score_term(half, scored) if scored else loss

    def _half_score_term(self, half: _Half, scored: list) -> torch.Tensor:
        """The score-function term of a decoding half on the whole batch (see :meth:`_score_term`):
        c_n is data point n's share of the half's loss (each x̃_n enters its own terms only: q̂(x)
        factorises over the data plate)."""
        sites = [s for t in half for s in sample_sites(t)]
        frames = [{f for f in s["cond_indep_stack"] if f.vectorized and f.name != _MARGINAL_PLATE} for s in sites]
        common = set.intersection(*frames)
        if len(common) != 1:
            raise ValueError(
                f"Trace_MIM: observed site {scored[0]['name']!r} is sampled without reparameterisation, so the "
                "decoding half's gradient takes a score-function term per data point, which needs one plate (the "
                f"data plate) holding every site; found {sorted(f.name for f in common) or 'none'}; use "
                "Trace_MIM(asymmetric=True)"
            )
        dim = next(iter(common)).dim
        marginal = -(self.max_plate_nesting + 1) if self.marginal_particles > 1 else None

        keep, ndim = {dim, marginal}, max(-dim, -(marginal or -1))

        def per_datum(trace, sign=1.0):  # Σ of the sites' log_prob over all dims but the data's (and K's)
            return sum(sign * _sum_except(s["log_prob"], keep, max(s["log_prob"].dim(), ndim))
                       for s in sample_sites(trace))

        log_w = per_datum(half.marginal_model_trace) + per_datum(half.marginal_guide_trace, -1.0)
        log_qx = log_mean_exp(log_w, marginal) if marginal is not None and torch.is_tensor(log_w) \
            and log_w.dim() >= -marginal else log_w
        cost = -(0.5 * (per_datum(half.guide_trace) + log_qx) + self.warmup_weight * per_datum(half.model_trace))
        return self._score_term(cost.reshape(-1), _per_point(scored, dim, scaled=False))

    @staticmethod
    def _score_term(cost: torch.Tensor, log_lik: torch.Tensor) -> torch.Tensor:
        """Σ_n sg(c_n - b_n) (log p(x̃_n|z̃_n) - sg(·)): zero in value, its gradient the score-function
        part of the gradient of Σ_n c_n with respect to the distribution x̃_n was drawn from
        (REINFORCE, Livne et al. 2019, App. D.2, for discrete x). ``cost`` (n,) holds each sampled
        point's share c_n of the loss, ``log_lik`` (n,) its log p(x̃_n|z̃_n); b_n is the mean of the
        others' costs (a baseline that keeps the estimate unbiased)."""
        cost = cost.detach()
        n = cost.numel()
        baseline = (cost.sum() - cost) / (n - 1) if n > 1 else torch.zeros_like(cost)
        return ((cost - baseline) * (log_lik - log_lik.detach())).sum()

    def _split_loss(self, split: _Split) -> torch.Tensor:
        """Σ_n w_n c_n over the points of the batch (nats), c_n the share of L_enc or L_dec of point
        n's half, w_n = B / (2 · its half's size), plus the score-function term of a discrete
        likelihood over the decoding points."""
        dim, decoding = split.dim, split.decoding
        log_qz = _per_point(sample_sites(split.draw), dim)
        log_pz = _per_point(sample_sites(split.model_trace), dim)
        log_q = torch.where(decoding, _per_point(sample_sites(split.guide_trace), dim), log_qz)
        log_p = torch.where(decoding, _per_point(sample_sites(split.generated), dim), log_pz)
        # log q̂(x) = log p(x, z') - log q(z'|x) (Alg. 2, K = 1): at an encoding point z' is its own z.
        cost = -(0.5 * (log_q + log_pz - log_qz) + self.warmup_weight * log_p)
        size, num_decoding = decoding.numel(), decoding.numel() // 2
        cost = cost * torch.where(decoding, size / (2 * num_decoding), size / (2 * (size - num_decoding)))
        scored = _scored(split.generated)
        if not scored:
            return cost.sum()
        return cost.sum() + self._score_term(cost[decoding], _per_point(scored, dim, scaled=False)[decoding])

    def _differentiable_loss_particle(self, traces: _MIMTraces) -> torch.Tensor:
        if traces.splits:
            return sum(self._split_loss(s) for s in traces.splits)
        loss = self._half_loss(traces.encoding)
        if traces.decoding:
            dec = sum(self._half_loss(h) for h in traces.decoding)
            # A vectorised encoding half holds all particles; so do the decoding halves together.
            loss = 0.5 * (loss + dec)
        return loss

    # --------------------------------------------------------------- interface
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of the MIM (or A-MIM) loss, in nats summed over the data plate.

        Does not advance the warm-up. Returns a float.
        """
        loss = 0.0
        with torch.no_grad():
            for traces in self._get_traces(model, guide, args, kwargs):
                loss += torch_item(self._differentiable_loss_particle(traces)) / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """The MIM (or A-MIM) loss as a differentiable scalar tensor (gradients pathwise, plus the
        score-function term of a discrete likelihood, zero in value).

        Counts as one training step for the warm-up.
        """
        loss = 0.0
        for traces in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._differentiable_loss_particle(traces) / self.num_particles
        warn_if_nan(loss, "loss")
        self.num_steps += 1
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Computes the loss, backpropagates it into the model's and guide's parameters and
        returns it as a float (one training step for the warm-up)."""
        loss = 0.0
        for traces in self._get_traces(model, guide, args, kwargs):
            loss_particle = self._differentiable_loss_particle(traces) / self.num_particles
            loss += torch_item(loss_particle)
            trainable = any(site["type"] == "param" for trace in traces.traces() for site in trace.nodes.values())
            if trainable and getattr(loss_particle, "requires_grad", False):
                loss_particle.backward(retain_graph=self.retain_graph)
        warn_if_nan(loss, "loss")
        self.num_steps += 1
        return loss


def _generated(model, args, kwargs) -> poutine.Trace:
    """A trace of the model with its observed sites sampled (:func:`~pyro.poutine.uncondition`):
    (z̃, x̃) ~ p(z) p(x|z), reparameterised where the distributions allow."""
    return prune_subsample_sites(poutine.trace(poutine.uncondition(model), graph_type="flat").get_trace(*args, **kwargs))


def _check_generated(trace) -> None:
    """Raises ValueError naming a latent site of the model without ``rsample`` (an observed site
    without it, Bernoulli pixels, gets a score-function term instead)."""
    for site in sample_sites(trace):
        if not site["fn"].has_rsample and not site["infer"].get("was_observed"):
            raise ValueError(
                f"Trace_MIM: latent site {site['name']!r} of the model ({type(site['fn']).__name__}) "
                "cannot be sampled with reparameterisation, which the decoding half of MIM needs "
                "(Livne et al. 2019, App. D.2); use Trace_MIM(asymmetric=True) (A-MIM, encoding "
                "samples only)"
            )


def _check_reparameterised(guide_trace) -> None:
    for site in sample_sites(guide_trace):
        if not site["fn"].has_rsample:
            raise ValueError(
                f"Trace_MIM: guide site {site['name']!r} ({type(site['fn']).__name__}) is not "
                "reparameterisable; MIM's gradients are pathwise (Livne et al. 2019, App. D.2)"
            )


def _replayed(model, guide_trace, args, kwargs) -> poutine.Trace:
    """The model's trace with its latent sites replayed from ``guide_trace``; a guide value of the
    wrong shape that fails deep in the model is reported by site."""
    try:
        trace = poutine.trace(poutine.replay(model, trace=guide_trace), graph_type="flat").get_trace(*args, **kwargs)
    except Exception as e:
        _check_event_shapes(_model_alone(model, args, kwargs), guide_trace, e)
        raise
    return prune_subsample_sites(trace)


def _draw(guide, guide_trace, args, kwargs) -> poutine.Trace:
    """A trace of z' ~ q(z'|x) at the arguments of ``guide_trace`` (a run of the guide replayed at
    other values): for a guide with one sample site, a draw from the distribution that run built
    (it depends on x and the parameters alone); else a fresh run of the guide, since a site's
    distribution may depend on the values of the sites before it."""
    sites = sample_sites(guide_trace)
    if len(sites) != 1:
        return prune_subsample_sites(poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs))
    site = sites[0]
    draw = guide_trace.copy()
    node = {k: v for k, v in site.items() if k not in ("log_prob", "unscaled_log_prob", "log_prob_sum")}
    node["value"] = site["fn"].rsample()
    draw.nodes[site["name"]] = node
    return draw


def _common_plate(sites):
    """``(dim, size)`` of the one vectorised, not subsampled plate that holds every site, each with
    that size at that batch dim, when its size is at least 2; else None."""
    frames = [{(f.name, f.dim, f.size) for f in s["cond_indep_stack"] if f.vectorized
               and f.full_size in (None, f.size)} for s in sites]
    common = set.intersection(*frames) if frames else set()
    if len(common) != 1:
        return None
    _, dim, size = next(iter(common))
    for s in sites:
        batch = s["fn"].batch_shape
        if len(batch) < -dim or batch[dim] != size:
            return None
    return (dim, size) if size >= 2 else None


def _scored(model_trace) -> list:
    """The observed sites that a decoding sample drew without ``rsample`` (score-function terms)."""
    return [s for s in sample_sites(model_trace)
            if s["infer"].get("was_observed") and not s["is_observed"] and not s["fn"].has_rsample]


def _per_point(sites, dim: int, scaled: bool = True) -> torch.Tensor:
    """Σ over ``sites`` of their log_prob summed over every batch dim but the data plate's ``dim``: a
    (B,) tensor, nats. ``scaled=False``: unscaled (masked), the density a sampled site was drawn from,
    whose score a score-function term takes."""
    lps = (s["log_prob"] if scaled else scale_and_mask(s["unscaled_log_prob"], mask=s["mask"]) for s in sites)
    return sum(_sum_except(lp, {dim}, lp.dim()).reshape(-1) for lp in lps)


def _model_alone(model, args, kwargs):
    """The model's trace without the guide, drawing nothing from the user's random stream."""
    with torch.random.fork_rng(devices=[]):
        return prune_subsample_sites(poutine.trace(model, graph_type="flat").get_trace(*args, **kwargs))


def _check_event_shapes(model_trace, guide_trace, cause: Exception | None = None) -> None:
    """Raises ValueError naming the first latent site whose guide value's event shape differs from
    the model's distribution at that site (``from cause`` where the model failed on it)."""
    guide = {s["name"]: s for s in sample_sites(guide_trace)}
    for site in sample_sites(model_trace):
        g = guide.get(site["name"])
        if site["is_observed"] or g is None:
            continue
        event = tuple(site["fn"].event_shape)
        value = tuple(g["value"].shape)
        if value[len(value) - len(event):] != event or len(value) < len(event):
            raise ValueError(
                f"Trace_MIM: the guide's site {site['name']!r} has a value of shape {value} (event shape "
                f"{tuple(g['fn'].event_shape)}) but the model's distribution at that site has event shape {event} "
                f"(batch shape {tuple(site['fn'].batch_shape)}); the guide must sample each latent site with the "
                "model's shape"
            ) from cause


def _same_scale(a, b) -> bool:
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
        return a == b
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return a.shape == b.shape and bool((a == b).all())


def _sum_except(log_prob, keep: set, ndim: int):
    """Sums a site's log_prob over every batch dim not in ``keep`` (negative dims), keeping
    ``ndim`` dims, so that sites of different plates add up elementwise."""
    if not torch.is_tensor(log_prob) or log_prob.dim() == 0:
        return log_prob
    if log_prob.dim() > ndim:
        raise ValueError(f"log_prob of shape {tuple(log_prob.shape)} has more than {ndim} batch dims")
    lp = log_prob.reshape((1,) * (ndim - log_prob.dim()) + log_prob.shape)
    dims = [d for d in range(-ndim + 1, 0) if d not in keep]
    return lp.sum(dims, keepdim=True) if dims else lp


