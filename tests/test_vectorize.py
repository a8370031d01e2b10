"""Models written for one data point (``A @ z``) run unchanged: plate, vmap and loop agree.

The same model is written twice: batched (``z @ A.T``, runs in pyro_mi's plates) and as
people write it for one point (``A @ z``, needs vmap or a loop). On the same (x, z) every
way gives the same log densities, gradients and bounds (float32 rounding: 1e-5 relative).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mi import GaussianEncoder, ModelDensity, estimate_mi
from pyro_mi.bounds.ais import ais_bounds
from pyro_mi.bounds.importance import iwae_bounds

_g = torch.Generator().manual_seed(0)
A, B = torch.randn(6, 3, generator=_g), torch.randn(6, generator=_g)


def one_point(x=None):
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(-1.0, 0.3))
    with pyro.plate("features", 6):
        return pyro.sample("x", dist.Normal(A @ z + B, s), obs=x)


def batched(x=None):
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(-1.0, 0.3))
    loc = (z @ A.T + B).reshape(z.shape[:-2] + (6,))  # z is (C, N, 1, 3) inside pyro_mi's plates
    with pyro.plate("features", 6):
        return pyro.sample("x", dist.Normal(loc, s), obs=x)


def branching(x=None):  # Python control flow on a latent value: vmap cannot run it
    z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    s = pyro.sample("s", dist.LogNormal(-1.0, 0.3))
    if float(s) < 0:  # never true (s > 0)
        raise AssertionError
    with pyro.plate("features", 6):
        return pyro.sample("x", dist.Normal(A @ z + B, s), obs=x)


@pytest.fixture(scope="module")
def densities():
    pyro.set_rng_seed(0)
    out = {"plate": ModelDensity(batched, "x"), "vmap": ModelDensity(one_point, "x"),
           "loop": ModelDensity(branching, "x")}
    return out


def test_auto_takes_the_first_way_that_runs(densities):
    assert {k: d.vectorize for k, d in densities.items()} == {"plate": "plate", "vmap": "vmap", "loop": "loop"}
    assert densities["plate"].notices == []
    for way in ("vmap", "loop"):
        notice = densities[way].notices[0]
        assert "does not run batched" in notice and "µs per point" in notice, notice
    assert "failed after site 's'" in densities["vmap"].notices[0]
    assert "vmap:" in densities["loop"].notices[0]  # why vmap was not taken
    layouts = {k: [(s.name, s.shape) for s in d.latent_sites] for k, d in densities.items()}
    assert layouts["vmap"] == layouts["loop"] == layouts["plate"]


def test_same_log_densities_and_gradients_on_the_same_draws(densities):
    pyro.set_rng_seed(1)
    x, z0 = densities["plate"].sample(20)
    z = torch.cat([z0[None], torch.randn(3, 20, 4)])  # (C=4, N=20, D=4): the true z and others
    ref = None
    for way, d in densities.items():
        zz = z.clone().requires_grad_()
        lp, ll = d.log_terms(x, zz)
        (grad,) = torch.autograd.grad((lp + ll).sum(), zz)
        if ref is None:
            ref = (lp, ll, grad)
            continue
        for got, want in zip((lp, ll, grad), ref):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=way)
    # and against the density written by hand
    s = z[..., 3].exp()
    want = (dist.Normal(0.0, 1.0).log_prob(z[..., :3]).sum(-1) + dist.Normal(-1.0, 0.3).log_prob(z[..., 3])
            + dist.Normal(z[..., :3] @ A.T + B, s[..., None]).log_prob(x["x"]).sum(-1))
    torch.testing.assert_close(ref[0] + ref[1], want, rtol=1e-5, atol=1e-4)


def test_vmap_simulates_the_model(densities):
    """Draws by vmap (randomness="different") are independent draws of the model: moments
    within 4 standard errors over 4,000 points, and no two points alike."""
    pyro.set_rng_seed(2)
    d = densities["vmap"]
    x, z = d.sample(4000)
    assert d._points.draws == "vmap"
    assert torch.unique(z[:, 0]).numel() == 4000
    n = 4000
    for col, (mean, sd) in enumerate([(0.0, 1.0)] * 3 + [(-1.0, 0.3)]):
        assert abs(float(z[:, col].mean()) - mean) < 4 * sd / n**0.5
        assert abs(float(z[:, col].std()) - sd) < 4 * sd / (2 * n) ** 0.5
    resid = (x["x"] - z[:, :3] @ A.T - B) / z[:, 3:].exp()
    assert abs(float(resid.std()) - 1.0) < 4 / (2 * resid.numel()) ** 0.5


def test_same_bounds_on_the_same_draws(densities):
    """IWAE and AIS (with the pilot) on the same x, z and a fixed encoder: per-point equal."""
    pyro.set_rng_seed(3)
    x, z = densities["plate"].sample(16)
    results = {}
    for way, d in densities.items():
        torch.manual_seed(4)
        q = GaussianEncoder(d)
        torch.manual_seed(5)
        iwae = iwae_bounds(d, q, x, z, num_particles=50, progress=False)
        # refine=0: which points a rerun takes is a ranking of pilot gaps, which rounding may reorder;
        # precondition="none": the per-point fit's hundreds of model runs, point by point in the loop way, cost
        # minutes here and test nothing the ways do not already share
        ais = ais_bounds(d, q, x, z, num_chains=4, num_steps=20, progress=False, refine=0.0, precondition="none",
                         generator=torch.Generator().manual_seed(6))
        results[way] = torch.stack([iwae.lower_per_point, iwae.upper_per_point,
                                    ais.lower_per_point, ais.upper_per_point])
    for way in ("vmap", "loop"):
        torch.testing.assert_close(results[way][:2], results["plate"][:2], rtol=1e-4, atol=1e-4)  # IWAE
        # AIS: the pilot's step sizes differ between ways by rounding (2e-5 on some machines), and 20 steps of
        # chains carry that to 1e-3 in a log weight; a different density would differ by far more
        torch.testing.assert_close(results[way][2:], results["plate"][2:], rtol=1e-3, atol=1e-3)


def test_prior_weights_agree_between_ways(densities):
    """The prior proposal's log weights log p(x|z_k), z_k ~ p(z), drawn each way: the same mean
    over 100 draws x 16 points within 5 se (the draws differ between ways)."""
    pyro.set_rng_seed(3)
    x, _ = densities["plate"].sample(16)
    means = {}
    for way, d in densities.items():
        torch.manual_seed(7)
        with torch.no_grad():
            log_w = d.prior_log_likelihood(x, 100)
        assert log_w.shape == (100, 16)
        means[way] = (log_w.mean(0), log_w.std(0) / 10)
    for way in ("vmap", "loop"):
        diff = means[way][0] - means["plate"][0]
        se = torch.hypot(means[way][1], means["plate"][1])
        assert torch.all(diff.abs() < 5 * se), (way, diff / se)


def test_one_point_model_brackets_the_truth_end_to_end():
    """``A @ z`` on a linear-Gaussian model: IWAE brackets ½ log det(I + AᵀA/σ²) per point."""
    torch.manual_seed(0)
    W, b = torch.randn(20, 4), torch.randn(20)

    def model(x=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(W @ z + b, 0.5).to_event(1), obs=x)

    r = estimate_mi(model, "x", method="iwae", num_data=500, num_particles=100, fit_steps=300, progress=False)
    assert r.settings["vectorize"] == "vmap" and "does not run batched" in r.notes[0]
    # paired against the exact per-point value log p(x_i|z_i) - log p(x_i)
    cov = W @ W.T + 0.25 * torch.eye(20)
    exact = (dist.Normal(r.z @ W.T + b, 0.5).log_prob(r.x["x"]).sum(-1)
             - dist.MultivariateNormal(b, cov).log_prob(r.x["x"]))
    lo, up = r.lower_per_point - exact, r.upper_per_point - exact
    assert float(lo.mean()) <= 3 * float(lo.std()) / 500**0.5
    assert float(up.mean()) >= -3 * float(up.std()) / 500**0.5


def test_randomness_outside_pyro_sample_is_refused():
    def model(x=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        noise = torch.randn(()) * 0.1  # not a pyro.sample site
        return pyro.sample("x", dist.Normal(z.sum() + noise, 1.0), obs=x)

    with pytest.raises(ValueError, match="site 'x'.*differs between two calls.*randomness outside pyro.sample"):
        ModelDensity(model, "x")


def test_vectorize_is_checked():
    with pytest.raises(ValueError, match="vectorize must be"):
        ModelDensity(batched, "x", vectorize="jit")

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match="data-plate model"):
        ModelDensity(model, "x", data=torch.zeros(3), vectorize="vmap")
    with pytest.raises(ValueError, match="one-data-point model"):
        ModelDensity(batched, "x", vectorize="fold")


def test_cli_runs_a_model_file_written_for_one_point(capsys, tmp_path):
    import json

    from pyro_mi.cli import main

    path = tmp_path / "model.py"
    path.write_text(
        "import torch, pyro, pyro.distributions as dist\n"
        "A = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))\n"
        "def model(x=None):\n"
        "    z = pyro.sample('z', dist.Normal(torch.zeros(2), 1.0).to_event(1))\n"
        "    return pyro.sample('x', dist.Normal(A @ z, 0.5).to_event(1), obs=x)\n")
    runs = {}
    for way in ("auto", "loop"):
        code = main(["estimate", f"{path}:model", "--obs", "x", "--num-data", "20", "--num-particles", "10",
                     "--fit-steps", "20", "--vectorize", way, "--json"])
        assert code == 0
        runs[way] = json.loads(capsys.readouterr().out)
    assert runs["auto"]["vectorize"] == "vmap" and "does not run batched" in runs["auto"]["notes"][0]
    assert runs["loop"]["vectorize"] == "loop" and runs["loop"]["lower"] <= runs["loop"]["upper"] + 0.5
