"""Tests of pyro_mi.Trace_MIM (Livne et al. 2019, MIM eq. 8, A-MIM eq. 12, Alg. 2).

The model is linear-Gaussian, z ~ N(0, I_2), x | z ~ N(W z + b, σ² I_3), and the
guide q(z|x) = N(A x + c, diag(s²)); all of W, b, σ, A, c, s are Pyro params.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam
from torch.distributions import Normal, constraints

from models import param_vae_guide, param_vae_model

import pyro_mi
from pyro_mi import Trace_MIM

D, d = 3, 2


def init_params(exact_posterior=False, W=None):
    """Fills Pyro's param store; returns the initial values (a dict of tensors)."""
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(1)
    W = torch.randn(D, d, generator=g) if W is None else W
    p = {
        "W": W,
        "b": torch.randn(D, generator=g),
        "sigma": torch.tensor(0.7),
        "A": 0.3 * torch.randn(d, D, generator=g),
        "c": 0.1 * torch.randn(d, generator=g),
        "q_scale": torch.tensor([0.5, 0.8]),
    }
    if exact_posterior:
        # Posterior of the linear-Gaussian model (needs WᵀW diagonal for a diagonal guide).
        prec = torch.eye(d) + p["W"].T @ p["W"] / p["sigma"] ** 2
        assert torch.allclose(prec, torch.diag(torch.diagonal(prec)))
        cov = torch.linalg.inv(prec)
        p["A"] = cov @ p["W"].T / p["sigma"] ** 2
        p["c"] = -p["A"] @ p["b"]
        p["q_scale"] = torch.diagonal(cov).sqrt()
    for k, v in p.items():
        pyro.param(k, v.clone(), constraint=constraints.positive if k in ("sigma", "q_scale") else constraints.real)
    return p


model, guide = param_vae_model, param_vae_guide


def data(n=5, seed=0):
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2.0


# ----------------------------------------------------------------- by hand
def hand_loss(p, x, asymmetric=False, K=1, beta=0.5):
    """Eq. 8 / 12 with Alg. 2's estimate of log q(x), drawing the same random numbers in
    the same order as Trace_MIM: enc z (K = 1: z estimates log q(x) too, as in Alg. 2; K > 1:
    enc z'_1..K); prior z̃, x̃, dec z̃'. MIM with K = 1 is Alg. 1's split (:func:`hand_split_loss`)."""
    W, b, sigma, A, c, s = (p[k] for k in ("W", "b", "sigma", "A", "c", "q_scale"))
    prior = Normal(torch.zeros(x.shape[0], d), 1.0)

    def log_p(x, z):  # log p(x|z) + log p(z), per point (…, N)
        return Normal(z @ W.T + b, sigma).log_prob(x).sum(-1) + Normal(0.0, 1.0).log_prob(z).sum(-1)

    def q(x):
        return Normal(x @ A.T + c, s)

    def log_qx(x, zp=None):  # log (1/K) Σ_k p(x, z'_k) / q(z'_k|x), z'_k a fresh draw unless given
        zp = (q(x).rsample((K,)) if K > 1 else q(x).rsample()) if zp is None else zp
        lw = log_p(x, zp) - q(x).log_prob(zp).sum(-1)
        return torch.logsumexp(lw, 0) - math.log(K) if K > 1 else lw

    def half(x, z, zp=None):
        return -(0.5 * (q(x).log_prob(z).sum(-1) + log_qx(x, zp)) + beta * log_p(x, z)).sum()

    if K == 1 and not asymmetric:
        return hand_split_loss(log_p, q, prior, p, x, beta)
    z = q(x).rsample()
    enc = half(x, z, z if K == 1 else None)
    if asymmetric:
        return enc
    z0 = prior.rsample()
    x0 = Normal(z0 @ W.T + b, sigma).rsample()
    return 0.5 * (enc + half(x0, z0))


def hand_split_loss(log_p, q, prior, p, x, beta):
    """Alg. 1: the prior's z̃, x̃ at every point, then ⌊B/2⌋ points at random take x̃ (decoding
    samples, scored at z̃), the others keep x (encoding samples, z' their z); z' ~ q(z|x) at the
    mixed batch estimates log q(x) at every point; each half's points weighted B / (2 · its size)."""
    B = x.shape[0]
    z0 = prior.rsample()
    x0 = Normal(z0 @ p["W"].T + p["b"], p["sigma"]).rsample()
    dec = torch.zeros(B, dtype=torch.bool)
    dec[torch.randperm(B)[: B // 2]] = True
    xm = torch.where(dec.unsqueeze(-1), x0, x)
    zp = q(xm).rsample()
    log_qz = q(xm).log_prob(zp).sum(-1)
    log_q = torch.where(dec, q(xm).log_prob(z0).sum(-1), log_qz)
    log_ps = torch.where(dec, log_p(x0, z0), log_p(xm, zp))
    cost = -(0.5 * (log_q + log_p(xm, zp) - log_qz) + beta * log_ps)
    return (cost * torch.where(dec, B / (2 * (B // 2)), B / (2 * (B - B // 2)))).sum()


@pytest.mark.parametrize("asymmetric", [False, True])
@pytest.mark.parametrize("K", [1, 3])
def test_loss_matches_hand_formula(asymmetric, K):
    p = init_params()
    x = data()
    loss = Trace_MIM(asymmetric=asymmetric, marginal_particles=K)
    torch.manual_seed(7)
    value = loss.loss(model, guide, x)
    torch.manual_seed(7)
    expected = hand_loss(p, x, asymmetric=asymmetric, K=K).item()
    assert value == pytest.approx(expected, rel=1e-5, abs=1e-4)
    # differentiable_loss gives the same number from the same draws.
    torch.manual_seed(7)
    assert loss.differentiable_loss(model, guide, x).item() == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_warmup_scales_decoder_cross_entropy():
    """β (the weight of CE(M_S, p(x,z)), sec. 5) rises 0 → ½ over warmup_steps; loss() does not step it."""
    p = init_params()
    x = data()
    loss = Trace_MIM(warmup_steps=4)
    assert loss.warmup_weight == 0.0
    torch.manual_seed(3)
    value = loss.loss(model, guide, x)
    torch.manual_seed(3)
    assert value == pytest.approx(hand_loss(p, x, beta=0.0).item(), rel=1e-5)
    for _ in range(2):
        loss.differentiable_loss(model, guide, x)
    assert loss.num_steps == 2 and loss.warmup_weight == 0.25
    torch.manual_seed(3)
    value = loss.loss(model, guide, x)
    torch.manual_seed(3)
    assert value == pytest.approx(hand_loss(p, x, beta=0.25).item(), rel=1e-5)
    loss.num_steps = 10
    assert loss.warmup_weight == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"asymmetric": True},
        {"marginal_particles": 4},
        {"num_particles": 3, "vectorize_particles": True},
        {"num_particles": 2, "vectorize_particles": True, "marginal_particles": 3},
    ],
)
def test_gradients_reach_every_parameter(kwargs):
    init_params()
    x = data(8)
    torch.manual_seed(0)
    Trace_MIM(**kwargs).loss_and_grads(model, guide, x)
    store = pyro.get_param_store()
    for name in ("W", "b", "sigma", "A", "c", "q_scale"):
        grad = store.get_param(name).unconstrained().grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_marginal_estimate_is_exact_with_the_true_posterior():
    """With q(z|x) = p(z|x), p(x, z') / q(z'|x) = p(x) for every z' (Alg. 2's estimate has no variance)."""
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = init_params(exact_posterior=True, W=W)
    x = data(6)
    for K in (1, 5):
        mim = Trace_MIM(marginal_particles=K)
        mim._ensure_plate_nesting(model, guide, (x,), {})
        log_qx = mim._log_marginal(*mim._marginal_traces(model, guide, (x,), {}))
        cov = p["W"] @ p["W"].T + p["sigma"] ** 2 * torch.eye(D)
        exact = dist.MultivariateNormal(p["b"], cov).log_prob(x).sum()
        assert log_qx.item() == pytest.approx(exact.item(), abs=1e-3)


def test_amim_equals_mim_when_encoding_and_decoding_distributions_agree():
    """Sec. 3.3: MIM and A-MIM differ only in the sampling distribution (M_S vs M_S^q), so with
    a consistent model (q(z|x) P(x) = p(x|z) P(z): data from the model, exact posterior) eq. 8 and
    eq. 12 are the same expectation. Checked to Monte-Carlo error; an inconsistent guide breaks it."""
    W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = init_params(exact_posterior=True, W=W)
    N = 20000
    torch.manual_seed(0)
    z = torch.randn(N, d)
    x = z @ p["W"].T + p["b"] + p["sigma"] * torch.randn(N, D)
    torch.manual_seed(1)
    mim = Trace_MIM().loss(model, guide, x) / N
    amim = Trace_MIM(asymmetric=True).loss(model, guide, x) / N
    # per-point loss = -log p(x, z), sd ≈ 1.6 nats; the difference has sd ≈ 0.008.
    assert abs(mim - amim) < 0.04
    # Power: a guide twice as wide makes the two sampling distributions differ.
    pyro.get_param_store()["q_scale"] = 2.0 * p["q_scale"]
    torch.manual_seed(1)
    mim = Trace_MIM().loss(model, guide, x) / N
    amim = Trace_MIM(asymmetric=True).loss(model, guide, x) / N
    assert abs(mim - amim) > 0.2


def _two_site_model(x):
    W, b, sigma = pyro.param("W"), pyro.param("b"), pyro.param("sigma")
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
        u = pyro.sample("u", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z @ W.T + b + u.unsqueeze(-1), sigma).to_event(1), obs=x)


def _two_site_guide(x):  # u's distribution depends on z's value: z' is drawn by a fresh run
    A, c, s = pyro.param("A"), pyro.param("c"), pyro.param("q_scale")
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x @ A.T + c, s).to_event(1))
        pyro.sample("u", dist.Normal(0.1 * z.sum(-1), 0.8))


@pytest.mark.parametrize("sites", ["one guide site", "two dependent guide sites"])
def test_alg1_split_has_the_expectation_of_both_halves_on_the_whole_batch(sites):
    """Alg. 1's split (half the points decoding samples, weighted) estimates the same eq. 8 as both
    halves on every point: on 20,000 points the per-point losses agree to Monte-Carlo error
    (sd of the difference about 0.04 nats here), for a guide whose z' comes from the distribution
    that scored z̃ and for one drawn by a fresh run."""
    p = init_params()
    m, g = (model, guide) if sites == "one guide site" else (_two_site_model, _two_site_guide)
    N = 20000
    torch.manual_seed(0)
    x = torch.randn(N, d) @ p["W"].T + p["b"] + p["sigma"] * torch.randn(N, D)
    split = Trace_MIM()
    assert split._data_plate(m, g, (x,), {}) == (-1, N)
    whole = Trace_MIM()
    whole._data_plate = lambda *args: None
    torch.manual_seed(1)
    a = split.loss(m, g, x) / N
    b = whole.loss(m, g, x) / N
    assert abs(a - b) < 0.15, (a, b)


def test_alg1_split_applies_where_every_site_is_in_one_data_plate():
    """The split needs per-point halves: one data plate holding every site, not subsampled, of two
    points or more, K = 1, MIM; else both halves run on the whole batch."""
    init_params()
    x = data(6)

    def global_model(x):
        W, b = pyro.param("W"), pyro.param("b")
        shift = pyro.sample("shift", dist.Normal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b + shift, 1.0).to_event(1), obs=x)

    def global_guide(x):
        guide(x)
        pyro.sample("shift", dist.Normal(0.0, 1.0))

    def subsampled_model(x):
        W, b = pyro.param("W"), pyro.param("b")
        with pyro.plate("data", x.shape[0], subsample_size=3) as i:
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, 1.0).to_event(1), obs=x[i])

    def subsampled_guide(x):
        A, c, s = pyro.param("A"), pyro.param("c"), pyro.param("q_scale")
        with pyro.plate("data", x.shape[0], subsample_size=3) as i:
            pyro.sample("z", dist.Normal(x[i] @ A.T + c, s).to_event(1))

    assert Trace_MIM()._data_plate(model, guide, (x,), {}) == (-1, 6)
    assert Trace_MIM()._data_plate(model, guide, (x[:1],), {}) is None
    assert Trace_MIM(marginal_particles=2)._data_plate(model, guide, (x,), {}) is None
    assert Trace_MIM(asymmetric=True)._data_plate(model, guide, (x,), {}) is None
    assert Trace_MIM()._data_plate(global_model, global_guide, (x,), {}) is None
    assert Trace_MIM()._data_plate(subsampled_model, subsampled_guide, (x,), {}) is None
    for m, g in ((global_model, global_guide), (subsampled_model, subsampled_guide)):
        assert math.isfinite(Trace_MIM().loss(m, g, x))


def test_pyros_vae_as_written_takes_the_split():
    """Pyro's VAE (examples/vae/vae.py: Bernoulli pixels observed as obs=x.reshape(-1, 784), images
    (B, 1, 28, 28) as the argument) trains by Alg. 1's split, its data written back by a reshape;
    the cost goal of symmetric MIM rests on this (benchmarks/mi_losses_cost.py)."""
    from pyro_mi.examples.zoo import VAE

    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = VAE(z_dim=2, hidden_dim=8)
    x = (torch.rand(8, 1, 28, 28) < 0.3).float()
    mim = Trace_MIM()
    assert mim._data_plate(vae.model, vae.guide, (x,), {}) == (-1, 8)
    assert math.isfinite(SVI(vae.model, vae.guide, Adam({"lr": 1e-3}), loss=mim).step(x))
    [(where, whole)] = mim._observed_slots.values()
    assert whole and where.slot == ("arg", 0)
    assert math.isfinite(mim.loss_and_grads(vae.model, vae.guide, x))
    for net in (vae.encoder, vae.decoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_vectorized_particles_match_sequential_particles():
    init_params()
    x = data(20)
    torch.manual_seed(0)
    seq = Trace_MIM(num_particles=400).loss(model, guide, x)
    torch.manual_seed(1)
    vec = Trace_MIM(num_particles=400, vectorize_particles=True).loss(model, guide, x)
    # per-particle loss sd is ~10 nats at N = 20: the mean of 400 has sd ~0.5.
    assert vec == pytest.approx(seq, abs=3.0)


def test_svi_steps_lower_the_loss():
    init_params()
    torch.manual_seed(0)
    x = torch.randn(200, d) @ torch.randn(D, d).T + 0.3 * torch.randn(200, D)
    mim = Trace_MIM(num_particles=20, vectorize_particles=True)
    torch.manual_seed(1)
    before = mim.loss(model, guide, x)
    svi = SVI(model, guide, Adam({"lr": 0.05}), loss=Trace_MIM())
    for _ in range(100):
        svi.step(x)
    torch.manual_seed(1)
    after = mim.loss(model, guide, x)
    assert after < before - 100.0, (before, after)


# ------------------------------------------------------------------- errors
def test_model_without_observed_sites_raises():
    init_params()

    def latent_only(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))

    with pytest.raises(ValueError, match="no observed sites"):
        Trace_MIM().loss(latent_only, guide, data())


def test_guide_missing_a_latent_site_raises():
    init_params()

    def model2(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            u = pyro.sample("u", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True) + u.unsqueeze(-1), 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="latent site 'u'"):
        Trace_MIM().loss(model2, guide, data())

    def guide2(x):
        guide(x)
        pyro.sample("extra", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="'extra'"):
        Trace_MIM().loss(model, guide2, data())


@pytest.mark.parametrize("uses", ["matmul", "broadcast"])
def test_guide_of_the_wrong_event_shape_names_the_site(uses):
    """A guide sampling z with event shape (3,) for the model's (2,): the model either fails on it
    (a matrix product) or broadcasts it silently; both are one error naming the site and shapes."""
    init_params()

    def model3(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            loc = z @ torch.ones(d, D) if uses == "matmul" else z.sum(-1, keepdim=True)
            pyro.sample("x", dist.Normal(loc, 1.0).to_event(1), obs=x)

    def guide3(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x, 1.0).to_event(1))

    for asymmetric in (True, False):
        with pytest.raises(ValueError, match=r"guide's site 'z' has a value of shape \(5, 3\).*event shape \(2,\)"):
            Trace_MIM(asymmetric=asymmetric).loss(model3, guide3, data())


def test_a_discrete_likelihood_runs_and_a_discrete_latent_is_refused():
    init_params()

    def bern_model(x):
        W, b = pyro.param("W"), pyro.param("b")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z @ W.T + b).to_event(1), obs=x)

    x = (data() > 0).float()
    for asymmetric in (False, True):  # a discrete likelihood: the score function (test below)
        assert math.isfinite(Trace_MIM(asymmetric=asymmetric).loss(bern_model, guide, x))

    def discrete_latent_model(x):
        W, b = pyro.param("W"), pyro.param("b")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(z @ W.T + b + k.unsqueeze(-1), 1.0).to_event(1), obs=x)

    def guide_k(x):
        A, c, sc = pyro.param("A"), pyro.param("c"), pyro.param("q_scale")
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ A.T + c, sc).to_event(1))
            pyro.sample("k", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="guide site 'k'"):
        Trace_MIM().loss(discrete_latent_model, guide_k, data())


def test_observed_value_computed_from_the_data_raises():
    init_params()

    def model_t(x):
        W, b = pyro.param("W"), pyro.param("b")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, 1.0).to_event(1), obs=x * 2.0)

    with pytest.raises(ValueError, match="observed value of site 'x' is computed from the model's arguments"):
        Trace_MIM().loss(model_t, guide, data())
    assert math.isfinite(Trace_MIM(asymmetric=True).loss(model_t, guide, data()))


def test_observed_values_are_found_by_site_however_the_model_reads_them():
    """obs=x.reshape(...) of an argument of another shape, as Pyro's VAE writes it: symmetric MIM
    writes the generated values back where the model reads them, and gives the loss and gradients
    of the same model observing its argument directly."""

    def flat_model(x):  # x (B, D)
        W, b = pyro.param("W"), pyro.param("b")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, 0.7).to_event(1), obs=x)

    def image_model(img):  # img (B, 1, D), read as in examples/vae/vae.py
        W, b = pyro.param("W"), pyro.param("b")
        with pyro.plate("data", img.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, 0.7).to_event(1), obs=img.reshape(-1, D))

    def image_guide(img):
        return guide(img.reshape(-1, D))

    x = data(16)
    for K in (1, 3):  # Alg. 1's split (K = 1) and both halves on the whole batch
        out = []
        for m, g, arg in ((flat_model, guide, x), (image_model, image_guide, x.unsqueeze(1))):
            init_params()
            torch.manual_seed(7)
            loss = Trace_MIM(marginal_particles=K).loss_and_grads(m, g, arg)
            out.append((loss, {n: pyro.param(n).unconstrained().grad.clone() for n in ("W", "A", "q_scale")}))
        assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
        for name in out[0][1]:
            assert torch.allclose(out[1][1][name], out[0][1][name], rtol=1e-5, atol=1e-6), (K, name)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="marginal_particles"):
        Trace_MIM(marginal_particles=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        Trace_MIM(warmup_steps=-1)
    with pytest.raises(TypeError, match="asymmetric"):
        Trace_MIM(asymmetric="yes")


def test_swap_in_for_trace_elbo_in_a_standard_vae_script():
    """A standard Pyro VAE (pyro.module networks, data plate) trains with Trace_MIM unchanged."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    enc = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2 * d))
    dec = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2 * D))

    def vae_model(x):
        pyro.module("decoder", dec)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            loc, log_scale = dec(z).chunk(2, -1)
            pyro.sample("x", dist.Normal(loc, log_scale.exp()).to_event(1), obs=x)

    def vae_guide(x):
        pyro.module("encoder", enc)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = enc(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    x = data(64)
    for loss in (Trace_ELBO(), Trace_MIM()):
        svi = SVI(vae_model, vae_guide, Adam({"lr": 1e-2}), loss=loss)
        losses = [svi.step(x) for _ in range(30)]
        assert all(math.isfinite(v) for v in losses)
    assert pyro_mi.Trace_MIM is Trace_MIM


# ------------------------------------------------------------- discrete likelihoods: score function
def _bernoulli_setup():
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(2, generator=g), "b": 0.5 * torch.randn(2, generator=g), "a": 0.5 * torch.randn(2, generator=g),
         "c": torch.tensor(0.1), "s": torch.tensor(0.8)}
    for k, v in p.items():
        pyro.param(k, v.clone(), constraint=constraints.positive if k == "s" else constraints.real)

    def bern_model(x):
        w, b = pyro.param("w"), pyro.param("b")
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z * w + b).to_event(1), obs=x)

    def bern_guide(x):
        a, c, s = pyro.param("a"), pyro.param("c"), pyro.param("s")
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x @ a + c).unsqueeze(-1), s).to_event(1))

    return bern_model, bern_guide


def _hand_mim_gradient(x: torch.Tensor) -> dict:
    """The symmetric MIM loss per data point (K = 1, β = ½) of the model above, its decoding half's
    expectation over x̃ taken exactly by enumerating the 4 values of x̃, the rest by the same
    reparameterised draws as Trace_MIM; returns the gradients of the unconstrained params."""
    names = ("w", "b", "a", "c", "s")
    params = {k: pyro.param(k).unconstrained() for k in names}
    for v in params.values():
        v.grad = None
    w, b, a, c, s = (pyro.param(k) for k in names)

    def log_p(xx, z):  # log p(x, z), z (..., 1)
        return Normal(0.0, 1.0).log_prob(z).sum(-1) + dist.Bernoulli(logits=z * w + b).log_prob(xx).sum(-1)

    def q(xx):
        return Normal((xx @ a + c).unsqueeze(-1), s)

    def cost(xx, z):  # one point's share of a half's loss, with a fresh z' for log q̂(x)
        z2 = q(xx).rsample()
        log_qx = log_p(xx, z2) - q(xx).log_prob(z2).sum(-1)
        return -(0.5 * (q(xx).log_prob(z).sum(-1) + log_qx) + 0.5 * log_p(xx, z))

    B = x.shape[0]
    enc = cost(x, q(x).rsample())
    z_dec = torch.randn(B, 1)
    dec = 0.0
    for bits in ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)):
        xt = torch.tensor(bits).expand(B, 2)
        weight = dist.Bernoulli(logits=z_dec * w + b).log_prob(xt).sum(-1).exp()
        dec = dec + weight * cost(xt, z_dec)
    (0.5 * (enc + dec).mean()).backward()
    return {k: v.grad.clone() for k, v in params.items()}


def _mim_gradient(model, guide, x) -> dict:
    names = ("w", "b", "a", "c", "s")
    for k in names:
        pyro.param(k).unconstrained().grad = None
    Trace_MIM().loss_and_grads(model, guide, x)
    return {k: pyro.param(k).unconstrained().grad.clone() / x.shape[0] for k in names}


def test_symmetric_mim_on_a_bernoulli_likelihood_has_the_enumerated_gradient(monkeypatch):
    """Bernoulli x cannot be reparameterised: the decoding half's gradient takes a score-function
    term. Its expectation equals the gradient with x̃ summed out exactly (4 values), within 4 standard
    errors over 12 runs of 2000 points; without the term the decoder's gradient is off by more."""
    model, guide = _bernoulli_setup()
    x = (torch.rand(2000, 2, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    torch.manual_seed(0)
    runs = {"mim": [], "hand": [], "pathwise only": []}
    for _ in range(12):
        runs["mim"].append(_mim_gradient(model, guide, x))
        runs["hand"].append(_hand_mim_gradient(x))
    monkeypatch.setattr(Trace_MIM, "_score_term", staticmethod(lambda cost, log_lik: torch.zeros(())))
    for _ in range(12):
        runs["pathwise only"].append(_mim_gradient(model, guide, x))

    def stats(key, name):
        v = torch.stack([r[name] for r in runs[key]]).reshape(12, -1)
        return v.mean(0), v.var(0) / 12

    for name in ("w", "b", "a", "c", "s"):
        (m1, v1), (m2, v2) = stats("mim", name), stats("hand", name)
        z = (m1 - m2) / (v1 + v2).sqrt()
        assert bool((z.abs() < 4).all()), (name, m1, m2, z)
    off = []
    for name in ("w", "b"):
        (m1, v1), (m2, v2) = stats("pathwise only", name), stats("hand", name)
        off.append(((m1 - m2) / (v1 + v2).sqrt()).abs().max())
    assert max(off) > 6, off


def test_mi_losses_take_deterministic_sites_and_a_subsampled_plate_as_trace_elbo_does():
    """pyro.deterministic and plate subsampling are sample sites of a trace that no loss may
    treat as data or latents (both losses refused such a model before)."""
    from pyro_mi.critics import JointCritic

    pyro.set_rng_seed(0)
    data, enc = torch.randn(64, 3), torch.nn.Linear(3, 4)

    def model(x):
        with pyro.plate("data", 64, subsample_size=16) as i:
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.deterministic("doubled", 2 * z)
            pyro.sample("x", dist.Normal(torch.cat([z, z[..., :1]], -1), 1.0).to_event(1), obs=x[i])

    def guide(x):
        pyro.module("enc", enc)
        with pyro.plate("data", 64, subsample_size=16) as i:
            h = enc(x[i])
            pyro.sample("z", dist.Normal(h[..., :2], h[..., 2:].exp()).to_event(1))

    for loss in (pyro_mi.TraceMI_ELBO(JointCritic(3, 2)), pyro_mi.Trace_MIM()):
        pyro.clear_param_store()
        value = SVI(model, guide, Adam({"lr": 1e-3}), loss).step(data)
        assert math.isfinite(value)
