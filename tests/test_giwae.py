"""GIWAE and InfoNCE with a known prior (Brekelmans et al. 2022, sec. 2.4, eq. 7, Cor. 2.3) on linear VAEs."""

import math

import pyro
import pytest
import torch
from torch import nn

from pyro_mi import GaussianEncoder, ModelDensity, estimate_mi, fit_guide
from pyro_mi.bounds import METHODS, ba_bounds, giwae_bounds, infonce_bounds, iwae_bounds
from pyro_mi.critics import JointCritic
from pyro_mi.examples.linear_vae import make_linear_vae

FAST = dict(hidden_sizes=(32, 32), batch_size=64, eval_every=50, progress=False)


@pytest.fixture(scope="module")
def setup():
    """A small linear VAE (z in R^2, x in R^5; MI = 1.869 nats), 2000 evaluation pairs, a BA-fitted encoder."""
    pyro.set_rng_seed(0)
    ex = make_linear_vae(latent_dim=2, obs_dim=5)
    d = ModelDensity(ex.model, "x")
    x, z = d.sample(2000)
    q = GaussianEncoder(d, hidden_sizes=(32,))
    fit_guide(d, q, num_steps=300, progress=False)
    return ex, d, x, z, q


class ConstantCritic(nn.Module):
    def __init__(self, c=3.7):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, z):
        return self.c.expand(torch.broadcast_shapes(x.shape[:-1], z.shape[:-1]))


def test_registered():
    assert METHODS["giwae"] is giwae_bounds and METHODS["infonce"] is infonce_bounds


def test_constant_critic_equals_ba_exactly(setup):
    _, d, x, z, q = setup
    pyro.set_rng_seed(1)
    r = giwae_bounds(d, q, x, z, 50, critic=ConstantCritic(), max_steps=50, **FAST)
    ba = ba_bounds(d, r.diagnostics["proposal"], x, z, progress=False)
    assert torch.allclose(r.lower_per_point, ba.lower_per_point, atol=1e-5)
    assert r.diagnostics["contrastive_term"] == pytest.approx(0.0, abs=1e-5)
    # the caller's encoder is not trained: GIWAE trains a copy
    assert r.diagnostics["proposal"] is not q


def test_k1_equals_ba_for_any_critic(setup):
    _, d, x, z, q = setup
    critic = JointCritic(d.obs_dim, d.latent_dim, (16,))
    r = giwae_bounds(d, q, x, z, 1, critic=critic, train_proposal=False, **FAST)
    ba = ba_bounds(d, q, x, z, progress=False)
    assert torch.allclose(r.lower_per_point, ba.lower_per_point, atol=1e-6)
    assert r.settings["steps"] == 0  # nothing to train


def test_giwae_below_iwae_below_ba_plus_log_k(setup):
    ex, d, x, z, q = setup
    K = 10
    pyro.set_rng_seed(2)
    g = giwae_bounds(d, q, x, z, K, max_steps=300, **FAST)
    qt = g.diagnostics["proposal"]
    iw = iwae_bounds(d, qt, x, z, K, progress=False)
    ba = ba_bounds(d, qt, x, z, progress=False)
    # decomposition of eq. 7: BA term (with the trained q) + contrastive term in [., log K]
    assert g.diagnostics["ba_term"] == pytest.approx(ba.lower, abs=1e-5)
    assert (g.diagnostics["contrastive_per_point"] <= math.log(K) + 1e-5).all()
    # Cor. 2.3: GIWAE <= IWAE (in expectation; 3 paired standard errors) <= BA + log K (per point)
    diff = iw.lower_per_point - g.lower_per_point
    assert float(diff.mean()) >= -3 * float(diff.std() / math.sqrt(diff.numel()))
    assert (iw.lower_per_point <= ba.lower_per_point + math.log(K) + 1e-4).all()
    # a lower bound on the true MI (1.869 nats) within 3 standard errors
    assert g.lower <= ex.true_mi + 3 * g.lower_stderr
    assert g.lower >= ex.true_mi - 0.2


def test_infonce_is_giwae_with_the_prior(setup):
    _, d, x, z, q = setup
    K = 8
    pyro.set_rng_seed(3)
    r = infonce_bounds(d, q, x, z, K, max_steps=200, **FAST)
    assert r.method == "infonce" and not r.settings["proposal_trained"]
    assert r.diagnostics["ba_term"] == 0.0
    assert (r.lower_per_point <= math.log(K) + 1e-5).all()
    assert 0.3 < r.lower <= math.log(K)


def test_bad_num_particles(setup):
    _, d, x, z, q = setup
    with pytest.raises(ValueError, match="num_particles"):
        giwae_bounds(d, q, x, z, 0, **FAST)


def test_estimate_mi_front_end():
    ex = make_linear_vae(latent_dim=2, obs_dim=5)
    r = estimate_mi(ex.model, "x", method="giwae", num_data=500, fit_steps=200, num_particles=10, max_steps=100,
                    batch_size=32, progress=False)
    assert r.method == "giwae" and r.num_data == 500 and r.seconds > 0
    assert r.lower <= ex.true_mi + 3 * r.lower_stderr
    assert r.lower > ex.true_mi - 0.5


@pytest.mark.parametrize("method", ["giwae", "infonce"])
def test_cli_estimate_on_the_builtin_example(capsys, method):
    from pyro_mi.cli import main
    import json

    code = main(["estimate", "--example", "linear-vae", "--method", method, "--num-data", "64", "--fit-steps", "20",
                 "--max-steps", "10", "--batch-size", "16", "--num-particles", "5", "--json", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    r = json.loads(out)
    assert r["method"] == method and r["num_particles"] == 5 and r["upper"] is None
    assert r["lower"] <= r["true_mi"]
    if method == "infonce":
        assert r["lower"] <= math.log(5)
