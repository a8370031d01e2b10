"""Tests of the traced densities (pyro_mi.samplers.compile): same numbers as the eager path, or a fallback."""

import json
import shutil
import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_mi.bounds import ais_bounds
from pyro_mi.bounds.ais import components_fn
from pyro_mi.density import ModelDensity
from pyro_mi.examples import get_example
from pyro_mi.proposal import GaussianEncoder, PriorProposal
from pyro_mi.samplers import anneal, get_schedule, hmc
from pyro_mi.samplers.compile import (AUTO_TRACE_EVALUATIONS, WHOLE_TRANSITION_STEPS, Compiled, compile_components,
                                      resolve_mode)
from pyro_mi.samplers.record import NotRecordable, record


def _problem(name="linear-vae", N=6):
    ex = get_example(name)
    d = ModelDensity(ex.model, ex.obs_sites)
    pyro.set_rng_seed(0)
    x, z = d.sample(N)
    return d, x, z


@pytest.mark.parametrize("proposal", ["prior", "encoder"])
def test_traced_evaluation_equals_eager(proposal):
    d, x, _ = _problem()
    q = PriorProposal(d) if proposal == "prior" else GaussianEncoder(d, (16,))
    comps = components_fn(d, q, x)
    traced = compile_components(comps, "trace")
    z = torch.randn(3, 6, d.latent_dim, generator=torch.Generator().manual_seed(1))
    with pyro.validation_enabled(False):
        for zz in (z, z[:2]):  # a second shape gets its own graph
            for _ in range(5):  # the first uses of a shape run eagerly, the fourth records
                for a, b in zip(hmc.eager_evaluate(comps, zz), traced.evaluate(zz)):
                    assert torch.equal(a, b)  # the same aten ops: bit for bit
    assert len(traced._graphs) == 2 and traced.notices == []


@pytest.mark.parametrize("name", ["linear-vae", "digits-vae"])
def test_ais_bounds_identical_with_trace(name):
    d, x, z = _problem(name, N=8)
    runs = {
        mode: ais_bounds(d, PriorProposal(d), x, z, num_chains=3, num_steps=12, num_leapfrog=2,
                         generator=torch.Generator().manual_seed(0), progress=False, compile=mode)
        for mode in ("none", "trace")
    }
    a, b = runs["none"], runs["trace"]
    assert torch.equal(a.lower_per_point, b.lower_per_point)
    assert torch.equal(a.upper_per_point, b.upper_per_point)
    assert torch.equal(a.diagnostics["step_sizes"], b.diagnostics["step_sizes"])  # the pilot ran traced too
    assert not [n for n in b.notes if "eager" in n] and b.settings["compile"] == "trace"  # no fallback notice


def _branching_model(x=None):
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    # Python control flow on a latent value: a trace would freeze one branch
    scale = 2.0 if float(z.detach().abs().max()) > 50 else 1.0
    return pyro.sample("x", dist.Normal(z * scale, 1.0).to_event(1), obs=x)


def test_control_flow_on_values_falls_back_to_eager_with_a_notice():
    d = ModelDensity(_branching_model, "x")
    pyro.set_rng_seed(0)
    x, z = d.sample(5)
    a, b = (ais_bounds(d, PriorProposal(d), x, z, num_chains=2, num_steps=6, generator=torch.Generator().manual_seed(0),
                       progress=False, compile=mode) for mode in ("none", "trace"))
    assert torch.equal(a.lower_per_point, b.lower_per_point)
    assert b.notes and "could not be traced" in b.notes[0] and "eagerly" in b.notes[0]
    assert "NOTE:" in str(b)


def test_a_trace_that_disagrees_with_the_eager_densities_is_not_used():
    def through_numpy(z):  # a value read into Python without an aten operation: the recording cannot see it
        lb = -0.5 * (z**2).sum(-1)
        return lb, lb * float(z.detach().numpy().max())

    c = Compiled(through_numpy)
    z = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        out = c.evaluate(z)
    assert len(out) == 4 and out[2].shape == z.shape
    assert list(c._graphs.values()) == [None]  # caught at the perturbed z
    assert "differ from the eager ones" in c.notices[0] and "output 1" in c.notices[0]


def test_random_draws_in_the_densities_are_not_recorded():
    def noisy(z):  # random numbers outside pyro.sample: a replay would draw others
        lb = -0.5 * (z**2).sum(-1)
        return lb, lb + 1e-2 * torch.randn(z.shape[:2])

    c = Compiled(noisy)
    z = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng():
        for _ in range(4):
            c.evaluate(z)
    assert list(c._graphs.values()) == [None]
    assert "could not be traced" in c.notices[0] and "draws random numbers" in c.notices[0]


def test_recording_neither_imports_the_compiler_nor_keeps_what_it_cannot_replay():
    """The recorder runs without torch._dynamo (a second of start-up), and refuses a value read into
    Python, a shape that depends on values, and a view it cannot name; integer indexing records."""
    code = ("import sys, torch; from pyro_mi.samplers.record import record; "
            "g = record(lambda z: (torch.autograd.grad((z.exp() * 2).sum(), z)[0],), (torch.ones(3, requires_grad=True),)); "
            "assert torch.equal(g(torch.zeros(3))[0], torch.full((3,), 2.0)); print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    z = torch.randn(5)
    with pytest.raises(NotRecordable, match="reads a value"):
        record(lambda z: (z * 2 if z.sum() > 0 else z,), (z,))
    with pytest.raises(NotRecordable, match="depends on values"):
        record(lambda z: (z[z > 0].sum(),), (z,))
    with pytest.raises(NotRecordable, match="shares memory"):
        record(lambda z: (z * torch.from_numpy(z.numpy()),), (z,))
    index = torch.tensor([4, 0, 0])
    g = record(lambda z: (z[index] * 3,), (z,))
    assert torch.equal(g(z + 1)[0], (z + 1)[index] * 3)


def test_modes_and_auto():
    comps = lambda z: (-(z**2).sum(-1), -(z**2).sum(-1))  # noqa: E731
    assert compile_components(comps, "none") is comps
    assert isinstance(compile_components(comps, "trace"), Compiled)
    with pytest.raises(ValueError, match="compile must be"):
        compile_components(comps, "jit")
    assert resolve_mode("auto", AUTO_TRACE_EVALUATIONS) == "trace"
    assert resolve_mode("auto", AUTO_TRACE_EVALUATIONS // 10, 10) == "trace"  # T x L leapfrog steps per chain
    assert resolve_mode("auto", AUTO_TRACE_EVALUATIONS // 10 - 1, 10) == "none"
    assert compile_components(comps, "trace").whole_transitions
    assert compile_components(comps, "trace", WHOLE_TRANSITION_STEPS).whole_transitions
    assert not compile_components(comps, "trace", WHOLE_TRANSITION_STEPS - 1).whole_transitions
    assert resolve_mode("inductor", 1) == "inductor"
    d, x, z = _problem(N=2)
    with pytest.raises(ValueError, match="compile must be 'auto' or one of"):
        ais_bounds(d, PriorProposal(d), x, z, num_steps=3, progress=False, compile="fast")


def test_anneal_with_traced_components_matches_eager():
    d, x, _ = _problem(N=4)
    comps = components_fn(d, PriorProposal(d), x)
    z0 = torch.randn(5, 4, d.latent_dim, generator=torch.Generator().manual_seed(3))
    rev = torch.tensor([False] * 4 + [True])
    betas = get_schedule("sigmoid", 20)
    traced = compile_components(comps, "trace")
    with torch.no_grad(), pyro.validation_enabled(False):
        a, b = (anneal(c, z0, rev, betas, 0.05, 3, torch.Generator().manual_seed(5)) for c in (comps, traced))
    assert torch.equal(a.log_weights, b.log_weights) and torch.equal(a.hmc.z, b.hmc.z)
    # the whole transition (3 leapfrog steps and the Metropolis test) ran as one recorded graph
    assert [k[:2] for k in traced._graphs if k[0] == "transition"] == [("transition", 3)]


def test_a_short_run_records_evaluations_and_gives_the_same_numbers():
    """Below WHOLE_TRANSITION_STEPS the leapfrog runs in Python around a graph of one evaluation
    (recorded at a shape's fourth use): bit for bit the eager numbers, and no transition graph."""
    d, x, _ = _problem(N=4)
    comps = components_fn(d, PriorProposal(d), x)
    z0 = torch.randn(5, 4, d.latent_dim, generator=torch.Generator().manual_seed(3))
    rev = torch.tensor([False] * 4 + [True])
    betas = get_schedule("sigmoid", 20)
    traced = compile_components(comps, "trace", num_steps=20)
    with torch.no_grad(), pyro.validation_enabled(False):
        a, b = (anneal(c, z0, rev, betas, 0.05, 3, torch.Generator().manual_seed(5)) for c in (comps, traced))
    assert torch.equal(a.log_weights, b.log_weights) and torch.equal(a.hmc.z, b.hmc.z)
    assert [k[0] for k, g in traced._graphs.items() if g is not None] == ["evaluate"]


def test_weights_that_require_grad_leave_no_autograd_history_in_the_chains():
    """A model whose network weights require grad (a VAE being trained): the traced transitions
    keep no autograd graph in the chains' states (it grew with every step, 3.1 GB at T = 300 on
    Pyro's VAE), and give the eager numbers."""
    net = torch.nn.Linear(2, 3)

    def model(x=None):
        z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        return pyro.sample("x", dist.Normal(net(z), 0.5).to_event(1), obs=x)

    d = ModelDensity(model, "x")
    torch.manual_seed(0)
    x, _ = d.sample(4)
    comps = components_fn(d, PriorProposal(d), x)
    z0 = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(3))
    rev = torch.tensor([False, False, True])
    betas = get_schedule("sigmoid", 12)
    traced = compile_components(comps, "trace")
    with torch.no_grad(), pyro.validation_enabled(False):
        a, b = (anneal(c, z0, rev, betas, 0.05, 2, torch.Generator().manual_seed(5)) for c in (comps, traced))
    assert any(k[0] == "transition" for k in traced._graphs if traced._graphs[k] is not None)
    assert not any(t.requires_grad for t in b.hmc) and not b.log_weights.requires_grad
    torch.testing.assert_close(b.log_weights, a.log_weights)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
def test_inductor_agrees_with_eager_within_float_error():
    d, x, z = _problem(N=4)
    a, b = (ais_bounds(d, PriorProposal(d), x, z, num_chains=2, num_steps=8, adapt="none",
                       generator=torch.Generator().manual_seed(0), progress=False, compile=mode)
            for mode in ("none", "inductor"))
    assert b.notes == []
    # fused kernels reorder float32 sums: equal to rounding, accept decisions the same here
    torch.testing.assert_close(a.lower_per_point, b.lower_per_point, rtol=0, atol=1e-3)
    torch.testing.assert_close(a.upper_per_point, b.upper_per_point, rtol=0, atol=1e-3)


def test_cli_compile_flag_gives_the_same_json_numbers(capsys):
    from pyro_mi.cli import main

    out = {}
    for mode in ("none", "trace"):
        assert main(["estimate", "--example", "linear-vae", "--method", "ais", "--num-data", "8", "--num-steps", "20",
                     "--fit-steps", "50", "--compile", mode, "--json"]) == 0
        out[mode] = json.loads(capsys.readouterr().out)
    # no graph fell back to eager (a crossing of the sides within noise is the only note here)
    assert out["trace"]["compile"] == "trace" and [n for n in out["trace"]["notes"] if "crossed" not in n] == []
    assert out["trace"]["lower"] == out["none"]["lower"] and out["trace"]["upper"] == out["none"]["upper"]
    assert main(["estimate", "--example", "linear-vae", "--method", "iwae", "--compile", "trace"]) == 2
    assert "--compile" in capsys.readouterr().err
