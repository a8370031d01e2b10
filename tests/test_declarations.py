"""Bounds declared once (``IWAE(...)``, ``AIS(...)``, ``MineAIS(...)``) and the runtime kept apart:
the declared and the shorthand forms give the same numbers, bit for bit; bad options fail when
declared, naming the option; the command line's flags are the declarations' fields."""

import dataclasses

import pytest
import torch

from models import linear_gaussian, two_sites
from pyro_mi import AIS, BA, GIWAE, IWAE, InfoNCE, MineAIS, Runtime, eig, estimate_mi
from pyro_mi.bounds import BOUNDS, bound_class, declare
from pyro_mi.cli import ESTIMATE_OPTIONS, method_options


@pytest.mark.parametrize("bound,method,options", [
    (IWAE(num_particles=20), "iwae", dict(num_particles=20)),
    (BA(num_particles=3), "ba", dict(num_particles=3)),
    (AIS(num_chains=2, num_steps=10, estimator="cr"), "cr-ais", dict(num_chains=2, num_steps=10)),
    (AIS(num_chains=2, num_steps=10, adapt="none", step_size=0.1), "ais",
     dict(num_chains=2, num_steps=10, adapt="none", step_size=0.1)),
])
def test_declared_bound_equals_the_shorthand_bit_for_bit(bound, method, options):
    model, _, _, _ = linear_gaussian()
    declared = estimate_mi(model, "x", bound=bound, num_data=40, fit_steps=30, progress=False)
    shorthand = estimate_mi(model, "x", method=method, num_data=40, fit_steps=30, progress=False, **options)
    assert declared.method == shorthand.method == bound.name
    assert torch.equal(declared.lower_per_point, shorthand.lower_per_point)
    assert torch.equal(declared.upper_per_point, shorthand.upper_per_point)
    assert declared.settings == shorthand.settings


def test_runtime_settings_go_beside_a_declared_bound(tmp_path):
    model, _ = two_sites()
    r = estimate_mi(model, "x", bound=AIS(num_chains=2, num_steps=5), num_data=16, progress=False,
                    points_per_block=8, compile="none")
    assert r.settings["compile"] == "none" and r.settings["num_steps"] == 5


def test_bad_options_fail_when_declared_naming_the_option():
    for make, name in [(lambda: AIS(num_chains=0), "num_chains"), (lambda: AIS(num_steps=1.5), "num_steps"),
                       (lambda: AIS(adapt="none", pilot_chains=3), "pilot_chains"),
                       (lambda: AIS(refine=2.0), "refine"), (lambda: AIS(estimator="xx"), "estimator"),
                       (lambda: AIS(step_size=0.0), "step_size"), (lambda: IWAE(num_particles=0), "num_particles"),
                       (lambda: GIWAE(batch_size=0), "batch_size"), (lambda: InfoNCE(train_particles=0), "train_particles"),
                       (lambda: MineAIS(ais=AIS()), "ais"), (lambda: MineAIS(num_val=0), "num_val"),
                       (lambda: MineAIS(likelihood_steps=-1), "likelihood_steps"),
                       (lambda: Runtime(compile="fast"), "compile"), (lambda: Runtime(points_per_block=0), "points_per_block"),
                       (lambda: Runtime(checkpoint_every=-1.0), "checkpoint_every")]:
        with pytest.raises(ValueError, match=name):
            make()


def test_a_bound_is_declared_or_given_by_method_not_both():
    model, _ = two_sites()
    with pytest.raises(ValueError, match="'method' given with bound"):
        estimate_mi(model, "x", bound=IWAE(), method="ba", progress=False)
    with pytest.raises(ValueError, match="'num_particles' given with bound"):
        estimate_mi(model, "x", bound=IWAE(), num_particles=5, progress=False)
    with pytest.raises(ValueError, match="'preset' given with bound"):
        estimate_mi(model, "x", bound=IWAE(), preset="fast", progress=False)
    with pytest.raises(TypeError, match="bound declaration"):
        estimate_mi(model, "x", bound="iwae", progress=False)


def test_declare_refuses_options_the_method_does_not_take():
    with pytest.raises(ValueError, match="takes no option 'checkpoint' \\(a runtime setting it does not use\\)"):
        declare("iwae", dict(checkpoint="run.pt"))
    with pytest.raises(ValueError, match="takes no option 'refine'"):
        declare("mine-ais", dict(refine=0.1))
    with pytest.raises(ValueError, match="estimator"):
        declare("cr-ais", dict(estimator="im"))
    with pytest.raises(ValueError, match="unknown method"):
        declare("nope", {})
    bound, runtime = declare("bdmc", dict(num_chains=3, checkpoint="run.pt"))
    assert bound == AIS(num_chains=3, estimator="bdmc") and runtime == Runtime(checkpoint="run.pt")


@pytest.mark.parametrize("method", sorted(BOUNDS))
def test_flat_options_round_trip(method):
    bound, _ = declare(method, {})
    assert bound.name in (method, "ais")  # "im-ais" is a second name of "ais"
    assert type(bound).from_options(**bound.options()) == bound
    assert set(bound.options()) == set(bound_class(method).option_fields())


def test_mine_ais_nests_its_ais_evaluation():
    bound, _ = declare("mine-ais", dict(num_chains=3, num_steps=7, max_steps=5))
    assert bound.ais == AIS(num_chains=3, num_steps=7, refine=0.0, precondition="none") and bound.max_steps == 5
    assert bound.options()["num_chains"] == 3 and "ais" not in bound.options()


def test_cli_flags_are_the_declared_fields():
    flags = {flag for flag, _ in ESTIMATE_OPTIONS}
    declared = {"--" + f.name.replace("_", "-") for m in BOUNDS for f in bound_class(m).option_fields().values()
                if "cli" in f.metadata}
    declared |= {"--" + f.name.replace("_", "-") for f in dataclasses.fields(Runtime) if "cli" in f.metadata}
    assert flags == declared
    assert {"num_chains", "likelihood_steps", "checkpoint"} <= set(method_options("mine-ais"))
    assert "refine" not in method_options("mine-ais") and "refine" in method_options("ais")


def test_eig_takes_a_declared_bound():
    import pyro
    import pyro.distributions as dist

    def model(design):
        with pyro.plate_stack("p", design.shape[:-1]):
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
            return pyro.sample("y", dist.Normal(theta.unsqueeze(-1) * design, 1.0).to_event(1))

    d = torch.linspace(0.1, 2, 3).reshape(3, 1)
    declared = eig(model, d, ["y"], ["theta"], bound=IWAE(num_particles=10), num_data=64)
    shorthand = eig(model, d, ["y"], ["theta"], method="iwae", num_particles=10, num_data=64)
    assert torch.equal(declared.lower, shorthand.lower) and torch.equal(declared.upper, shorthand.upper)
