"""The zoo models that pyro_mi runs point by point (by vmap), rewritten to broadcast over leading
batch dims, for the speed comparison of ``benchmarks/model_zoo.py --speed``: the same sites,
priors and log densities (the benchmark checks it), written with ``(w * design).sum(-1)`` for
``design @ w``, ``expand(batch_shape + ...)`` and ``pyro.ops.indexing.Vindex``."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex

from pyro_mi.examples.zoo import K


def logistic_regression(design, y=None):
    w = pyro.sample("w", dist.Normal(torch.zeros(design.shape[-1]), 1.0).to_event(1))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", design.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(w * design).sum(-1) + b), obs=y)

def gamma_poisson_regression(features, counts):
    N, P = features.shape
    scale = pyro.sample("scale", dist.LogNormal(0, 1))
    coef = pyro.sample("coef", dist.Normal(0, scale.unsqueeze(-1)).expand(scale.shape + (P,)).to_event(1))
    rate = torch.nn.functional.softplus((coef * features).sum(-1))
    concentration = pyro.sample("concentration", dist.LogNormal(0, 1))
    with pyro.plate("bins", N):
        return pyro.sample("counts", dist.GammaPoisson(concentration, rate), obs=counts)

@config_enumerate
def gmm(data):
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(Vindex(locs.unsqueeze(-2))[..., assignment], scale), obs=data)

#: zoo name -> its broadcasting rewrite
REWRITES = {}


def hmm(sequences, lengths, hidden_dim=2):
    num_sequences, max_length, data_dim = sequences.shape
    probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(hidden_dim) + 0.1).to_event(1))
    probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([hidden_dim, data_dim]).to_event(2))
    py = probs_y.squeeze(-3) if probs_y.dim() > 2 else probs_y  # its tones dim comes from the indexing
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    with pyro.plate("sequences", num_sequences, dim=-2):
        x = 0
        for t in pyro.markov(range(int(lengths.max()))):
            x = pyro.sample("x_{}".format(t), dist.Categorical(Vindex(probs_x)[..., x, :]),
                            infer={"enumerate": "parallel"})
            with tones_plate:
                pyro.sample("y_{}".format(t), dist.Bernoulli(Vindex(py)[..., x.squeeze(-1), :]), obs=sequences[:, t])


REWRITES.update(logistic_regression=logistic_regression, gamma_poisson=gamma_poisson_regression, gmm=gmm, hmm=hmm)
