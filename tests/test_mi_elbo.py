"""Tests of pyro_mi.TraceMI_ELBO, the ELBO minus λ times a critic's ξ-bound on I(x; z)
(VAE-MINE appendix eq. 2-10), and of pyro_mi.infer.xi_bound."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch.distributions import Normal, constraints

from models import param_vae_guide, param_vae_model

from pyro_mi import TraceMI_ELBO
from pyro_mi.critics import JointCritic
from pyro_mi.infer import xi_bound
from pyro_mi.infer.mi_elbo import DEFAULT_CRITIC_HIDDEN

D, d = 3, 2
GUIDE_PARAMS = ("A", "c", "q_scale")
MODEL_PARAMS = ("W", "b", "sigma")


def init_params():
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(1)
    values = {
        "W": torch.randn(D, d, generator=g),
        "b": torch.randn(D, generator=g),
        "sigma": torch.tensor(0.7),
        "A": 0.3 * torch.randn(d, D, generator=g),
        "c": 0.1 * torch.randn(d, generator=g),
        "q_scale": torch.tensor([0.5, 0.8]),
    }
    for k, v in values.items():
        pyro.param(k, v, constraint=constraints.positive if k in ("sigma", "q_scale") else constraints.real)


model, guide = param_vae_model, param_vae_guide


def data(n=16, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2.0


def make_critic(seed=0):
    torch.manual_seed(seed)
    return JointCritic(D, d, hidden_sizes=(16,))


def unconstrained_grads(names):
    store = pyro.get_param_store()
    out = {}
    for n in names:
        g = store.get_param(n).unconstrained().grad
        out[n] = torch.zeros_like(store.get_param(n).unconstrained()) if g is None else g.clone()
    return out


def zero_grads():
    for _, p in pyro.get_param_store().named_parameters():
        p.grad = None


def test_zero_weight_reduces_to_trace_elbo():
    init_params()
    x = data()
    mi = TraceMI_ELBO(make_critic(), mi_weight=0.0)
    for fn in ("loss", "differentiable_loss"):
        torch.manual_seed(5)
        a = getattr(Trace_ELBO(), fn)(model, guide, x)
        torch.manual_seed(5)
        b = getattr(mi, fn)(model, guide, x)
        a, b = (v.item() if torch.is_tensor(v) else v for v in (a, b))
        assert b == pytest.approx(a, rel=1e-6)
    names = MODEL_PARAMS + GUIDE_PARAMS
    zero_grads()
    torch.manual_seed(5)
    Trace_ELBO().loss_and_grads(model, guide, x)
    ga = unconstrained_grads(names)
    zero_grads()
    torch.manual_seed(5)
    mi.loss_and_grads(model, guide, x)
    gb = unconstrained_grads(names)
    for n in names:
        assert torch.allclose(ga[n], gb[n], atol=1e-6), n


def test_loss_value_is_minus_elbo_minus_weighted_bound():
    init_params()
    x = data()
    lam = 0.7
    mi = TraceMI_ELBO(make_critic(), mi_weight=lam, xi=0.5, num_negatives=None)
    torch.manual_seed(2)
    value = mi.loss(model, guide, x)
    torch.manual_seed(2)
    elbo_loss = Trace_ELBO().loss(model, guide, x)
    torch.manual_seed(2)
    bound = mi.mi_bound(model, guide, x)
    assert bound == pytest.approx(mi.last_mi_bound, rel=1e-5)
    assert value == pytest.approx(elbo_loss - lam * x.shape[0] * bound, rel=1e-5)


def test_critic_gradient_increases_the_bound():
    """The critic's parameters get -N ∇ψ I_ξ (weight independent of λ > 0): a small descent step on
    the loss in ψ alone raises the bound on the same draws."""
    init_params()
    x = data(64)
    critic = make_critic()
    mi = TraceMI_ELBO(critic, mi_weight=0.3, num_negatives=None)
    torch.manual_seed(3)
    before = mi.mi_bound(model, guide, x)
    critic.zero_grad()
    torch.manual_seed(3)
    mi.loss_and_grads(model, guide, x)
    grads = [p.grad.clone() for p in critic.parameters()]
    assert all(g.abs().sum() > 0 for g in grads)
    # The gradient is exactly -N ∇ψ I_ξ at the same z.
    torch.manual_seed(3)
    z = Normal(x @ pyro.param("A").T.detach() + pyro.param("c").detach(), pyro.param("q_scale").detach()).rsample()
    critic.zero_grad()
    (-x.shape[0] * xi_bound(critic, x, z)).backward()
    for g, p in zip(grads, critic.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for g, p in zip(grads, critic.parameters()):
            p -= 1e-4 * g
    torch.manual_seed(3)
    after = mi.mi_bound(model, guide, x)
    assert after > before


def test_encoder_gradient_flows_through_z_only():
    """Guide gradients of TraceMI_ELBO minus those of Trace_ELBO (same draws) equal
    -λ N ∇φ I_ξ(f_sg(ψ)(x, z(φ))) with z = loc_φ(x) + s_φ ε; model gradients are unchanged."""
    init_params()
    x = data()
    lam = 2.0
    critic = make_critic()
    mi = TraceMI_ELBO(critic, mi_weight=lam, num_negatives=None)
    zero_grads()
    torch.manual_seed(4)
    Trace_ELBO().loss_and_grads(model, guide, x)
    g_elbo = unconstrained_grads(MODEL_PARAMS + GUIDE_PARAMS)
    zero_grads()
    torch.manual_seed(4)
    mi.loss_and_grads(model, guide, x)
    g_mi = unconstrained_grads(MODEL_PARAMS + GUIDE_PARAMS)
    zero_grads()
    torch.manual_seed(4)
    z = Normal(x @ pyro.param("A").T + pyro.param("c"), pyro.param("q_scale")).rsample()
    (-lam * x.shape[0] * xi_bound(critic, x, z)).backward()
    g_hand = unconstrained_grads(GUIDE_PARAMS)
    for n in GUIDE_PARAMS:
        assert g_hand[n].abs().sum() > 0, n
        assert torch.allclose(g_mi[n] - g_elbo[n], g_hand[n], rtol=1e-4, atol=1e-5), n
    for n in MODEL_PARAMS:
        assert torch.allclose(g_mi[n], g_elbo[n], atol=1e-6), n


def test_xi_bound_is_tight_at_the_optimal_critic():
    """Correlated Gaussians: with f* = log p(x,z) / (p(x) p(z)) - log ξ (eq. 3) the bound equals the
    MI, -½ log(1 - ρ²), up to Monte-Carlo error; a constant critic gives at most 0."""
    rho, B = 0.8, 1500
    torch.manual_seed(0)
    x = torch.randn(B, 1)
    z = rho * x + math.sqrt(1 - rho**2) * torch.randn(B, 1)
    true_mi = -0.5 * math.log(1 - rho**2)
    for xi in (1.0, 0.3):

        def f_star(xx, zz):
            cond = Normal(rho * xx, math.sqrt(1 - rho**2)).log_prob(zz).sum(-1)
            return cond - Normal(0.0, 1.0).log_prob(zz).sum(-1) - math.log(xi)

        assert xi_bound(f_star, x, z, xi).item() == pytest.approx(true_mi, abs=0.08)
    assert xi_bound(lambda xx, zz: torch.zeros(torch.broadcast_shapes(xx.shape, zz.shape)[:-1]), x, z).item() <= 1e-6


def test_svi_trains_the_critic_and_the_bound_rises():
    init_params()
    torch.manual_seed(0)
    x = torch.randn(64, d) @ torch.randn(D, d).T + 0.3 * torch.randn(64, D)
    critic = make_critic()
    mi = TraceMI_ELBO(critic, mi_weight=1.0)
    torch.manual_seed(1)
    before = mi.mi_bound(model, guide, x)
    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=mi)
    for _ in range(120):
        svi.step(x)
    assert "mi_critic$$$net.0.weight" in pyro.get_param_store().keys()
    torch.manual_seed(1)
    after = mi.mi_bound(model, guide, x)
    assert after > before + 0.5, (before, after)


def test_default_critic_is_built_at_the_first_step_and_trained():
    """TraceMI_ELBO() builds a JointCritic(x_dim, z_dim, DEFAULT_CRITIC_HIDDEN) at its first
    evaluation, registered in Pyro's param store, and SVI raises its bound."""
    init_params()
    torch.manual_seed(0)
    x = torch.randn(64, d) @ torch.randn(D, d).T + 0.3 * torch.randn(64, D)
    mi = TraceMI_ELBO()
    with pytest.raises(ValueError, match="no critic yet"):
        mi.mi_bound(model, guide, x)
    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=mi)
    svi.step(x)
    assert isinstance(mi.critic, JointCritic) and (mi.critic.x_dim, mi.critic.z_dim) == (D, d)
    assert mi.critic.net[0].out_features == DEFAULT_CRITIC_HIDDEN[0]
    torch.manual_seed(1)
    before = mi.mi_bound(model, guide, x)
    for _ in range(120):
        svi.step(x)
    assert "mi_critic$$$net.0.weight" in pyro.get_param_store().keys()
    torch.manual_seed(1)
    assert mi.mi_bound(model, guide, x) > before + 0.5


def test_errors():
    init_params()
    x = data()
    with pytest.raises(TypeError, match="critic"):
        TraceMI_ELBO(lambda a, b: a.sum(-1))
    with pytest.raises(ValueError, match="mi_weight"):
        TraceMI_ELBO(make_critic(), mi_weight=-1.0)
    with pytest.raises(ValueError, match="xi"):
        TraceMI_ELBO(make_critic(), xi=0.0)

    def no_obs(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))

    with pytest.raises(ValueError, match="no observed sites"):
        TraceMI_ELBO(make_critic()).loss(no_obs, guide, x)

    def global_model(x):
        g = pyro.sample("g", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(g, 1.0).expand([D]).to_event(1), obs=x)

    def global_guide(x):
        pyro.sample("g", dist.Normal(pyro.param("c")[0], 1.0))

    with pytest.raises(ValueError, match="data plate"):
        TraceMI_ELBO(JointCritic(D, 1, hidden_sizes=(4,))).loss(global_model, global_guide, x)
    with pytest.raises(ValueError, match="at least 2"):
        TraceMI_ELBO(make_critic()).loss(model, guide, x[:1])


def test_xi_bound_with_fewer_negatives_uses_the_shifted_pairs():
    """With k negatives the mismatched pairs are (x_i, z_{i+r mod B}) for k distinct shifts r drawn from
    1..B-1 at each call; k >= B - 1 is all pairs."""
    torch.manual_seed(0)
    x, z = torch.randn(6, 2), torch.randn(6, 3)
    critic = lambda xx, zz: (xx.sum(-1) * zz.sum(-1)).tanh()  # noqa: E731
    B, k = 6, 2
    joint = critic(x, z)
    shifts = (torch.randperm(B - 1, generator=torch.Generator().manual_seed(5))[:k] + 1).tolist()
    neg = torch.stack([critic(x[i], z[(i + r) % B]) for i in range(B) for r in shifts])
    expect = joint.mean() - neg.exp().mean() + 1.0
    value = xi_bound(critic, x, z, 1.0, num_negatives=k, generator=torch.Generator().manual_seed(5))
    assert value.item() == pytest.approx(expect.item(), rel=1e-5)
    assert xi_bound(critic, x, z, 1.0, num_negatives=5).item() == pytest.approx(xi_bound(critic, x, z).item(), rel=1e-6)


def test_zero_weight_never_runs_the_critic():
    init_params()

    class Refuses(torch.nn.Module):
        def forward(self, x, z):
            raise AssertionError("the critic ran")

    svi = SVI(model, guide, Adam({"lr": 0.01}), loss=TraceMI_ELBO(Refuses(), mi_weight=0.0))
    assert math.isfinite(svi.step(data()))
