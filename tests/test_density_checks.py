"""Bad models that used to give silent wrong numbers are refused by ModelDensity, naming the site."""

import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_mi
from pyro_mi import ModelDensity
from pyro_mi.density.packing import boundary_points


# ------------------------------------------------- per-point density depends on the batch
def _reduces_in_likelihood(x=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    return pyro.sample("x", dist.Normal(z.mean(), 1.0), obs=x)  # z.mean() reduces over pyro_mi's batch dims


def _reduces_in_prior(x=None):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a.sum(), 1.0))
    return pyro.sample("x", dist.Normal(b, 1.0), obs=x)


@pytest.mark.parametrize("model, site", [(_reduces_in_likelihood, "x"), (_reduces_in_prior, "b")])
def test_reduction_over_the_batch_is_refused_when_batched(model, site):
    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match=rf"site '{site}' at one data point depends on the other points.*reduce"):
        ModelDensity(model, "x", vectorize="plate")
    # "auto" falls back to vmap, where a reduction over all dims of one point is what the model means
    d = ModelDensity(model, "x")
    assert d.vectorize == "vmap" and "does not run batched" in d.notices[0]


def test_reduction_over_the_batch_in_a_data_plate_model_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            return pyro.sample("x", dist.Normal(z.mean(), 1.0), obs=x)

    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match="site 'x' at one data point depends on the other points"):
        ModelDensity(model, "x", data=torch.zeros(5))


def test_building_a_density_does_not_move_the_rng():
    def model(x=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(z.sum(-1), 1.0), obs=x)  # an event-dim reduction is fine

    pyro.set_rng_seed(3)
    before = torch.get_rng_state()
    ModelDensity(model, "x")
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------- batch dims no plate declares
def test_undeclared_batch_dims_are_one_data_point():
    # as NUTS sums them (issue "models as written"): the batch (4,) of x is one data point; eig,
    # where such a batch may be one of designs, asks for batch_dims
    design = torch.randn(4, 2)

    def model(design, x=None):
        w = pyro.sample("w", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(design @ w, 1.0), obs=x)  # batch shape (4,)

    d = ModelDensity(model, "x", model_args=(design,))
    assert d.obs_shapes == {"x": torch.Size([4])}
    assert any("no pyro.plate declares (sites 'x' (4,))" in n for n in d.notices)
    x, z = d.sample(5)
    torch.testing.assert_close(d.log_likelihood(x, z), dist.Normal(z @ design.T, 1.0).log_prob(x["x"]).sum(-1))
    msg = r"site 'x' has batch shape \(4,\) with dims that no pyro.plate declares.*batch_dims="
    with pytest.raises(ValueError, match=msg):
        pyro_mi.eig(model, design, "x", num_data=8, num_particles=4)


def test_batch_dims_declared_by_a_plate_are_one_data_point():
    def model(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("features", 10):
            return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    d = ModelDensity(model, "x")
    assert d.obs_shapes == {"x": torch.Size([10])}
    x, z = d.sample(4)
    torch.testing.assert_close(d.log_likelihood(x, z), dist.Normal(z, 1.0).log_prob(x["x"]).sum(-1))


# ------------------------------------------------- latent values at the boundary of the support
def test_latent_at_the_boundary_is_refused_when_built():
    def model(x=None):
        g = pyro.sample("g", dist.Gamma(0.001, 1.0))  # float32 draws underflow and are clamped near 0
        return pyro.sample("x", dist.Normal(g, 1.0), obs=x)

    pyro.set_rng_seed(0)
    with pytest.raises(ValueError, match=r"latent site 'g' has \d+ of 6 simulated points at the boundary of its"):
        ModelDensity(model, "x")


def test_latent_at_the_boundary_is_refused_when_simulated():
    concentration = {"g": 2.0}

    def model(x=None):
        g = pyro.sample("g", dist.Gamma(concentration["g"], 1.0))
        return pyro.sample("x", dist.Normal(g, 1.0), obs=x)

    d = ModelDensity(model, "x")
    concentration["g"] = 0.001
    pyro.set_rng_seed(0)
    msg = r"latent site 'g' has \d+ of 200 simulated points at the boundary.*float32"
    with pytest.raises(ValueError, match=msg):
        d.sample(200)


def test_boundary_points():
    c = dist.constraints
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    tiny = torch.finfo(torch.float32).tiny
    v = torch.tensor([[0.5, 0.5, below_one]])  # one value next to the bound can be a fair torch.rand draw
    assert not boundary_points(c.unit_interval, v, 1, 3).any()
    v = torch.tensor([[0.5, below_one, below_one]])  # repeated: clamped draws
    assert boundary_points(c.unit_interval, v, 1, 3).tolist() == [[False, True, True]]
    v = torch.tensor([[1.0, tiny, 0.0, 0.0]])
    assert boundary_points(c.positive, v, 1, 4).tolist() == [[False, True, True, True]]
    v = torch.tensor([[[0.5, 0.5 - tiny, tiny], [0.2, 0.3, 0.5]]])
    assert boundary_points(c.simplex, v, 1, 2).tolist() == [[True, False]]
