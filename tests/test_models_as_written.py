"""Models as their authors wrote them (issue "if NUTS runs it, pyro_mi runs it"): observed values
conditioned by site whatever ``obs=`` is, methods of a class, undeclared batch dims, enumerated
discrete latents, the zoo, and the command line. Bounds are checked by paired differences against
exact per-point log p(x) where the zoo has it."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from models import paired_sides

import pyro_mi
from pyro_mi import GuideDensity, ModelDensity
from pyro_mi.cli import main
from pyro_mi.examples import zoo as zoo_module
from pyro_mi.examples.zoo import zoo


def assert_bounds(result, log_marginal, tight: float | None = None):
    (lo, lo_se), (up, up_se) = paired_sides(result, log_marginal)
    assert lo <= 4 * lo_se, f"lower side above the truth: {lo} ± {lo_se}"
    assert up >= -4 * up_se, f"upper side below the truth: {up} ± {up_se}"
    if tight is not None:
        assert abs(lo) < tight and abs(up) < tight, (lo, up)


# ------------------------------------------------------------------ the VAE of examples/vae/vae.py
def test_the_vae_class_runs_as_written_with_its_own_guide():
    torch.manual_seed(0)
    vae = zoo_module.VAE(z_dim=3, hidden_dim=20)
    images = torch.zeros(8, 1, 28, 28)  # image-shaped: the model observes x.reshape(-1, 784)
    d = ModelDensity(vae.model, "obs", model_args=(images,))
    assert d.has_data_plate and d.arguments.rows == 8 and d.obs_shapes == {"obs": torch.Size([784])}
    assert any("plate 'data' encloses every sample site" in n for n in d.notices)
    x, z = d.sample(20)
    # the guide reads the simulated images from its argument, where the model reads them
    q = GuideDensity(d, vae.guide)
    loc, scale = vae.encoder(x["obs"])
    torch.testing.assert_close(q.log_prob(z, x), dist.Normal(loc, scale).log_prob(z).sum(-1))
    r = pyro_mi.estimate_mi(vae.model, "obs", guide=vae.guide, model_args=(images,), num_data=64,
                            num_particles=20, progress=False)
    assert r.lower <= r.upper + 3 * (r.lower_stderr + r.upper_stderr)
    assert r.settings["vectorize"] == "plate"


def test_observed_values_are_found_in_the_arguments():
    # a slice (examples/eight_schools/svi.py: y = data[:, 0]), rows of a per-point argument
    def svi_style(data):
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, data[:, 1]), obs=data[:, 0])

    data = torch.stack([torch.zeros(8), torch.linspace(1.0, 2.0, 8)], -1)
    d = ModelDensity(svi_style, "obs", model_args=(data,))
    assert d.has_data_plate and d._located_observed()["obs"].columns.tolist() == 0
    x, z = d.sample(16)
    args, _ = d.arguments.bind(torch.arange(16), observed=x)
    torch.testing.assert_close(args[0][:, 0], x["obs"])  # the values written where obs= reads them
    torch.testing.assert_close(args[0][:, 1], data[torch.arange(16) % 8, 1])  # the covariate cycled
    # the likelihood at those points uses each point's own covariate
    expected = dist.Normal(z[:, 0], data[torch.arange(16) % 8, 1]).log_prob(x["obs"])
    torch.testing.assert_close(d.log_likelihood(x, z), expected)

    # a one-data-point model observing a transpose of an integer argument, converted to float
    def transposed(counts):
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        pyro.sample("obs", dist.Binomial(5, p).expand([3, 2]).to_event(2), obs=counts.T.float())

    counts = torch.tensor([[1, 2, 3], [4, 5, 0]])
    d = ModelDensity(transposed, "obs", model_args=(counts,))
    assert not d.has_data_plate and d._located_observed()["obs"].index.tolist() == [[0, 3], [1, 4], [2, 5]]
    x, _ = d.sample(4)
    args, _ = d.arguments.bind(observed=x)
    assert args[0].shape == (4, 2, 3) and args[0].dtype == counts.dtype
    torch.testing.assert_close(args[0].transpose(-1, -2).float(), x["obs"])


def test_a_guide_of_an_observation_computed_from_its_argument_is_refused():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("obs", dist.Normal(z, 1.0), obs=x / 255)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 255, 1.0))

    with pytest.raises(ValueError, match=r"site 'obs' is computed from argument 'x' in a way pyro_mi cannot invert"):
        pyro_mi.estimate_mi(model, "obs", guide=guide, model_args=(torch.zeros(4),), num_data=8, progress=False)
    # without a guide the model runs: the observed values are conditioned by name
    r = pyro_mi.estimate_mi(model, "obs", model_args=(torch.zeros(4),), num_data=32, fit_steps=50, progress=False)
    assert r.lower is not None


def test_a_model_called_without_its_arguments_says_which():
    vae = zoo_module.VAE(z_dim=2, hidden_dim=8)
    with pytest.raises(ValueError, match=r"missing 1 required positional argument: 'x'.*model_args="):
        ModelDensity(vae.model, "obs")


# ------------------------------------------------------------------ exact zoo models, paired
@pytest.mark.parametrize("name, method, options, tight", [
    ("fully_pooled", "iwae", dict(proposal="prior", num_particles=500), 0.1),
    ("not_pooled", "iwae", dict(proposal="prior", num_particles=500), 0.05),
    ("working_memory", "iwae", dict(proposal="prior", num_particles=500), 0.01),
    ("eight_schools", "iwae", dict(proposal="prior", num_particles=200), None),
    ("eight_schools_centred", "ais", dict(proposal="prior", num_steps=20), None),
])
def test_zoo_models_bound_their_exact_mi(name, method, options, tight):
    m = zoo()[name]
    r = pyro_mi.estimate_mi(m.model, m.obs_sites, model_args=m.model_args, method=method, num_data=512, seed=1,
                            progress=False, **options)
    assert_bounds(r, m.log_marginal, tight)


@pytest.mark.slow
def test_linear_regression_of_the_tutorial_bounds_its_exact_mi():
    m = zoo()["linear_regression"]
    r = pyro_mi.estimate_mi(m.model, m.obs_sites, model_args=m.model_args, method="iwae", proposal="prior",
                            num_particles=100, num_data=256, seed=2, progress=False)
    assert_bounds(r, m.log_marginal)


def test_every_zoo_model_runs_as_written():
    for name, m in zoo().items():
        r = pyro_mi.estimate_mi(m.model, m.obs_sites, model_args=m.model_args, model_kwargs=m.model_kwargs,
                                guide=m.guide, method="iwae", num_data=32, num_particles=8, fit_steps=20, seed=0,
                                progress=False)
        assert r.lower is not None and math.isfinite(r.lower) and math.isfinite(r.upper), name
        json.dumps(r.to_dict(), allow_nan=False)


# ------------------------------------------------------------------ enumerated discrete latents
W_MIX, MU_MIX, S_MIX = torch.tensor([0.3, 0.7]), torch.tensor([-2.0, 1.5]), 0.5


def mixture(x=None):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    c = pyro.sample("c", dist.Categorical(W_MIX), infer={"enumerate": "parallel"})
    return pyro.sample("x", dist.Normal(z + MU_MIX[c], S_MIX), obs=x)


def mixture_log_marginal(x):
    v = x["x"].double().unsqueeze(-1)
    comp = dist.Normal(MU_MIX.double(), math.sqrt(1 + S_MIX**2)).log_prob(v) + W_MIX.double().log()
    return torch.logsumexp(comp, -1)


def test_enumerated_sites_are_summed_out_exactly():
    d = ModelDensity(mixture, "x")
    assert d.enumerated == ("c",) and [s.name for s in d.latent_sites] == ["z"]
    assert any("summed out exactly" in n for n in d.notices)
    x, z = d.sample(50)
    expected = torch.logsumexp(dist.Normal(z + MU_MIX, S_MIX).log_prob(x["x"].unsqueeze(-1)) + W_MIX.log(), -1)
    torch.testing.assert_close(d.log_likelihood(x, z), expected)
    torch.testing.assert_close(d.log_prior(z, x), dist.Normal(0.0, 1.0).log_prob(z[:, 0]))


@pytest.mark.parametrize("method, options", [("iwae", dict(num_particles=1000)),
                                             ("ais", dict(num_steps=30, num_chains=8))])
def test_an_enumerated_mixture_bounds_its_exact_mi(method, options):
    r = pyro_mi.estimate_mi(mixture, "x", method=method, proposal="prior", num_data=600, seed=3, progress=False,
                            **options)
    assert_bounds(r, mixture_log_marginal, tight=0.02)


def test_an_unmarked_discrete_latent_points_to_config_enumerate():
    def model(x=None):
        c = pyro.sample("c", dist.Bernoulli(0.5))
        z = pyro.sample("z", dist.Normal(c, 1.0))
        return pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(ValueError, match=r"latent site 'c' is discrete \(Bernoulli\).*config_enumerate"):
        ModelDensity(model, "x")


# ------------------------------------------------------------------ draws the dtype cannot hold
def test_boundary_draws_are_moved_and_said():
    m = zoo()["partially_pooled"]
    d = ModelDensity(m.model, m.obs_sites, model_args=m.model_args)
    torch.manual_seed(0)
    d.sample(512)
    assert any("latent site 'phi'" in w and "moved to the nearest float inside it" in w and "float64" in w
               for w in d.warnings)


def test_the_boundary_message_tells_the_dtype_of_the_run():
    def model(x=None):
        g = pyro.sample("g", dist.Gamma(torch.tensor(1e-4, dtype=torch.float64), 1.0))
        return pyro.sample("x", dist.Normal(g, 1.0), obs=x)

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="underflowed in torch.float64") as info:
        ModelDensity(model, "x").sample(100)
    assert "use float64" not in str(info.value)


def test_points_whose_density_overflows_are_redrawn_and_said():
    def model(x=None):
        z = pyro.sample("z", dist.Normal(0.0, 2.0))
        # the variance exp(-2 z^2) underflows in float32 for |z| > 6.6: about 1 point in 1000
        return pyro.sample("x", dist.Normal(z, torch.exp(-z**2)), obs=x)

    torch.manual_seed(0)
    d = ModelDensity(model, "x")
    with pyro.validation_enabled(False):
        x, z = d.sample(2000)
    assert torch.isfinite(d.log_likelihood(x, z)).all()
    assert any("were not representable" in w and "redrawn" in w for w in d.warnings)


def test_out_of_memory_is_one_line():
    with pytest.raises(MemoryError, match=r"out of memory: iwae on N = 10000000000000 simulated points asked for .* "
                                          r"lower num_data"):
        pyro_mi.estimate_mi(mixture, "x", num_data=10**13, progress=False)


# ------------------------------------------------------------------ the command line
VAE_FILE = '''
import torch
from pyro_mi.examples.zoo import VAE

torch.manual_seed(0)
vae = VAE(z_dim=3, hidden_dim=20)
'''


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line_takes_models_as_written(capsys, tmp_path):
    (tmp_path / "vae_file.py").write_text(VAE_FILE)
    np.save(tmp_path / "batch.npy", np.zeros((16, 784), dtype=np.float32))
    np.save(tmp_path / "sigma.npy", zoo_module.SIGMA.numpy())
    common = ("--num-data", "32", "--num-particles", "10", "--json")
    code, out, err = run(capsys, "estimate", f"{tmp_path / 'vae_file.py'}:vae.model", "--obs", "obs", "--guide",
                         f"{tmp_path / 'vae_file.py'}:vae.guide", "--data", f"x={tmp_path / 'batch.npy'}", *common)
    assert code == 0, err
    assert json.loads(out)["lower"] is not None
    code, out, err = run(capsys, "estimate", "pyro_mi.examples.zoo:eight_schools", "--obs", "obs", "--model-arg",
                         f"sigma={tmp_path / 'sigma.npy'}", "--proposal", "prior", *common)
    assert code == 0, err
    assert any("no pyro.plate declares" in n for n in json.loads(out)["notes"])
    code, out, err = run(capsys, "estimate", "pyro_mi.examples.zoo:eight_schools_centred", "--obs", "obs",
                         "--model-arg", "J=8", "--model-arg", f"sigma={tmp_path / 'sigma.npy'}", "--proposal", "prior",
                         *common)
    assert code == 0, err


def test_command_line_says_which_flag_supplies_what(capsys, tmp_path):
    np.save(tmp_path / "names.npy", np.array(["a", "b"]))
    np.save(tmp_path / "sigma.npy", zoo_module.SIGMA.numpy())
    for argv, message in (
        (("pyro_mi.examples.zoo:eight_schools", "--obs", "obs"),
         "needs its argument 'sigma': give it with --data sigma=FILE"),
        (("pyro_mi.examples.zoo:eight_schools", "--obs", "obs", "--model-arg", f"sigma={tmp_path / 'sigma.npy'}",
          "--model-arg", "tau=3"), "cannot take the arguments given"),
        (("--example", "linear-vae", "--data", f"x={tmp_path / 'names.npy'}"), "--data does not apply to --example"),
        (("--example", "linear-vae", "--proposal", "prior", "--fit-steps", "5"),
         "--fit-steps does not apply to --proposal prior"),
        (("pyro_mi.examples.zoo:eight_schools", "--obs", "obs", "--model-arg", f"sigma={tmp_path / 'names.npy'}"),
         "cannot be a model argument"),
    ):
        code, _, err = run(capsys, "estimate", *argv)
        assert code == 2 and message in err, err
