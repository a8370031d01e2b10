"""Every path on CUDA when the model's tensors are there (skipped without a GPU).

A linear-Gaussian model with known MI is built with CUDA tensors; each method of
``estimate_mi`` runs on it and must bracket the truth, the samplers must not synchronise
with the host, the traced densities must equal the eager ones, and MIM training and the
sample-only bounds must run on the device.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_mi import Trace_MIM, estimate_mi
from pyro_mi.bounds import METHODS
from pyro_mi.bounds.ais import components_fn
from pyro_mi.density import ModelDensity
from pyro_mi.proposal import PriorProposal
from pyro_mi.samplers import anneal, get_schedule, hmc
from pyro_mi.samplers.compile import compile_components
from pyro_mi.samples import estimate_mi_samples

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
D, OBS, NOISE = 4, 12, 0.7


def linear_model(tensor_scales=False):
    """The model on CUDA. Python-float scales are how people write models, but torch.distributions
    copies them to the device at every call (a host sync); ``tensor_scales`` avoids that."""
    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(OBS, D, generator=g).to(CUDA), torch.randn(OBS, generator=g).to(CUDA)
    loc0 = torch.zeros(D, device=CUDA)
    one, noise = (torch.tensor(1.0, device=CUDA), torch.tensor(NOISE, device=CUDA)) if tensor_scales else (1.0, NOISE)

    def model(x=None):
        z = pyro.sample("z", dist.Normal(loc0, one).to_event(1))
        return pyro.sample("x", dist.Normal(z @ W.T + b, noise).to_event(1), obs=x)

    gram = torch.eye(D, dtype=torch.float64) + (W.T @ W).double().cpu() / NOISE**2
    return model, 0.5 * float(torch.logdet(gram))


FAST = {
    "ba": {}, "iwae": {"num_particles": 64},
    "ais": {"num_chains": 4, "num_steps": 50}, "im-ais": {"num_chains": 4, "num_steps": 50},
    "cr-ais": {"num_chains": 4, "num_steps": 50}, "bdmc": {"num_chains": 4, "num_steps": 50},
    "giwae": {"num_particles": 16, "max_steps": 300}, "infonce": {"num_particles": 16, "max_steps": 300},
    "mine-ais": {"max_steps": 200, "num_steps": 50},
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_on_cuda_and_brackets_the_truth(method):
    model, true_mi = linear_model()
    r = estimate_mi(model, "x", method=method, num_data=256, fit_steps=300, progress=False, **FAST[method])
    assert r.z.device.type == "cuda"
    tol = 4 * max(r.lower_stderr or 0.0, r.upper_stderr or 0.0) + 0.05
    assert r.lower is not None and r.lower <= true_mi + tol
    if r.upper is not None:
        assert r.upper >= true_mi - tol


def test_samplers_do_not_synchronise_and_trace_equals_eager_on_cuda():
    model, _ = linear_model(tensor_scales=True)
    d = ModelDensity(model, "x")
    pyro.set_rng_seed(0)
    x, _ = d.sample(32)
    comps = components_fn(d, PriorProposal(d), x)
    z0 = torch.randn(8, 32, D, device=CUDA)
    rev = torch.zeros(8, dtype=torch.bool, device=CUDA)
    betas = get_schedule("sigmoid", 30).to(CUDA)
    traced = compile_components(comps, "trace")
    with torch.no_grad(), pyro.validation_enabled(False):
        traced.evaluate(z0)  # record (and check) outside the loop: the check reads values on the host
        runs = []

        def no_sync_after_first_step(state, info):  # the set-up before the loop may read the host
            torch.cuda.set_sync_debug_mode("error")

        for c in (comps, traced):
            anneal(c, z0, rev, betas, torch.full((31, 32), 0.1, device=CUDA), 2,
                   torch.Generator(device=CUDA).manual_seed(1))  # warm-up: record the transition's graph
            try:
                state = anneal(c, z0, rev, betas, torch.full((31, 32), 0.1, device=CUDA), 2,
                               torch.Generator(device=CUDA).manual_seed(1), on_step=no_sync_after_first_step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            runs.append(state)
    assert traced.notices == []
    assert torch.equal(runs[0].log_weights, runs[1].log_weights)
    assert runs[0].log_weights.device.type == "cuda"
    for a, b in zip(hmc.eager_evaluate(comps, z0), traced.evaluate(z0)):
        assert torch.equal(a, b)


def test_mim_training_step_on_cuda():
    pyro.clear_param_store()

    def model(x):
        W = pyro.param("W", torch.randn(OBS, D, device=CUDA))
        sigma = pyro.param("sigma", torch.tensor(1.0, device=CUDA), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(D, device=CUDA), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T, sigma).to_event(1), obs=x)

    def guide(x):
        A = pyro.param("A", torch.zeros(D, OBS, device=CUDA))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ A.T, 0.5).to_event(1))

    x = torch.randn(64, OBS, device=CUDA)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_MIM())
    losses = [svi.step(x) for _ in range(5)]
    assert all(math.isfinite(v) for v in losses)
    assert pyro.param("A").device.type == "cuda" and pyro.param("A").abs().sum() > 0


def test_sample_only_bound_on_cuda():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, 1, generator=g)
    x = 0.8 * z + 0.6 * torch.randn(2000, 1, generator=g)  # rho = 0.8: MI = -0.5 log(1 - 0.64)
    r = estimate_mi_samples(x.to(CUDA), z.to(CUDA), "infonce", max_steps=300, progress=False)
    assert r.lower <= -0.5 * math.log(1 - 0.64) + 4 * r.lower_stderr + 0.05 and r.lower > 0.2
