"""Reading a sandwich (issue 33): the per-point table, reruns and sweeps, the pictures, and the
command line's --per-point and --plot."""

import json

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch

matplotlib.use("Agg")

import pyro_mi  # noqa: E402
from pyro_mi.cli import main  # noqa: E402
from pyro_mi.examples.linear_vae import make_linear_vae  # noqa: E402


@pytest.fixture(scope="module")
def linear():
    return make_linear_vae(seed=0, latent_dim=2, obs_dim=4, noise_scale=0.5)


@pytest.fixture(scope="module")
def recorded(linear):
    return pyro_mi.estimate_mi(linear.model, "x", method="ais", num_data=32, num_chains=3, num_steps=20,
                               record=True, progress=False)


def heavy_tailed(x=None):
    """A Cauchy location: a few simulated points lie far out, where a prior proposal is poor."""
    z = pyro.sample("z", dist.Cauchy(0.0, 1.0))
    return pyro.sample("x", dist.Normal(z, 0.1), obs=x)


def test_per_point_rows_match_the_result(recorded):
    df = recorded.per_point()
    assert len(df) == 32 and df.index.name == "point"
    assert torch.allclose(torch.tensor(df["lower"].values), recorded.lower_per_point.double())
    assert torch.allclose(torch.tensor(df["gap"].values),
                          (recorded.upper_per_point - recorded.lower_per_point).double())
    assert abs(df["lower"].mean() - recorded.lower) < 1e-6 and abs(df["upper"].mean() - recorded.upper) < 1e-6
    assert ((df["accept_rate"] > 0) & (df["accept_rate"] <= 1)).all()
    assert abs(df["accept_rate"].mean() - recorded.diagnostics["accept_rate"]) < 0.02  # the same transitions
    assert ((df["ess"] >= 1 - 1e-4) & (df["ess"] <= 3 + 1e-4)).all()  # of K = 3 chains
    assert set(df.columns) >= {"log_p_x_lower", "log_p_x_upper", "divergent_chains", "stuck_chains", "warnings"}


def test_per_point_names_the_points_that_carry_the_gap():
    # IWAE from the prior on a Cauchy location: the far-out points carry the gap, and the table,
    # the warnings and diagnostics name the same ones, widest first
    r = pyro_mi.estimate_mi(heavy_tailed, "x", method="iwae", proposal="prior", num_data=200, num_particles=20,
                            progress=False)
    df = r.per_point()
    named = r.diagnostics["dominant_points"]
    widest = df.sort_values("gap", ascending=False)
    assert named and list(widest.index[:len(named)]) == named
    assert df.loc[named, "dominant"].all() and not df.drop(index=named)["dominant"].any()
    assert all("carry the gap" in w for w in df.loc[named, "warnings"])
    assert any(", ".join(str(i) for i in named[:5]) in w for w in r.warnings)
    # the loose points are the ones far out: their |x| is larger than the typical point's
    assert df.loc[named, "ess"].mean() < df["ess"].median()
    assert r.x["x"][named].abs().median() > 3 * r.x["x"].abs().median()


def test_per_point_refuses_a_result_without_points():
    empty = pyro_mi.MIResult("ais", None, None)
    with pytest.raises(ValueError, match="no per-point values"):
        empty.per_point()


def test_rerun_bounds_the_same_points_with_the_same_random_numbers(linear, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    # precondition="none": the chains start from the prior itself, so that fewer steps widen the sandwich
    r = pyro_mi.estimate_mi(linear.model, "x", method="ais", proposal="prior", num_data=32, num_chains=3,
                            num_steps=20, precondition="none", checkpoint=str(ckpt), progress=False)
    ckpt.unlink(missing_ok=True)
    same = r.rerun()
    assert torch.equal(same.lower_per_point, r.lower_per_point) and torch.equal(same.upper_per_point,
                                                                                r.upper_per_point)
    assert not ckpt.exists()  # a rerun writes no files
    assert same.settings["seed"] == 0 and same.settings["proposal"] == "prior"
    short = r.rerun(num_steps=2)
    assert short.settings["num_steps"] == 2 and torch.equal(short.x["x"], r.x["x"])
    # fewer annealing steps from the prior: a wider sandwich on the same points (paired over points)
    widening = (short.upper_per_point - short.lower_per_point) - (r.upper_per_point - r.lower_per_point)
    assert widening.mean() > 3 * widening.std() / 32 ** 0.5


def test_sweep_and_plot(recorded, tmp_path):
    runs = pyro_mi.sweep(recorded, (2, 20))
    assert runs[1] is recorded and runs[0].settings["num_steps"] == 2
    path = tmp_path / "sandwich.png"
    fig = pyro_mi.plot(recorded, path, sweep=runs)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [ax.get_title() for ax in fig.axes]
    assert any("per-point gap" in t for t in titles)
    assert any("annealing path" in t for t in titles)  # the recorded chains
    assert any("sandwich against num_steps" in t for t in titles)
    with pytest.raises(ValueError, match="no option 'num_particles'"):
        pyro_mi.sweep(recorded, (10,), option="num_particles")
    with pytest.raises(ValueError, match="needs a result of pyro_mi.estimate_mi"):
        pyro_mi.sweep(pyro_mi.MIResult("ais", recorded.lower_per_point, None), (10,))


def test_plot_of_iwae_sweeps_num_particles(linear, tmp_path):
    r = pyro_mi.estimate_mi(linear.model, "x", method="iwae", num_data=32, num_particles=100, progress=False)
    fig = pyro_mi.plot(r, tmp_path / "iwae.pdf", sweep=pyro_mi.sweep(r, (1, 10, 100), option="num_particles"))
    assert (tmp_path / "iwae.pdf").stat().st_size > 0
    assert len(fig.axes) == 2 and fig.axes[1].get_xlabel() == "K (importance samples)"


def test_cli_per_point_and_plot(capsys, tmp_path):
    csv, png = tmp_path / "points.csv", tmp_path / "sandwich.png"
    code = main(["estimate", "--example", "linear-vae", "--method", "ais", "--num-data", "16", "--num-steps", "20",
                 "--num-chains", "2", "--per-point", str(csv), "--plot", str(png), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and not out["write_errors"]
    lines = csv.read_text().splitlines()
    assert len(lines) == 17 and lines[0].startswith("point,lower,upper,gap")
    assert png.stat().st_size > 10_000


def test_cli_output_files_are_checked_before_any_work(capsys, tmp_path):
    for flag in ("--per-point", "--plot"):
        code = main(["estimate", "--example", "linear-vae", flag, str(tmp_path / "missing" / "f.png")])
        err = capsys.readouterr().err
        assert code == 2 and f"{flag} " in err and "does not exist" in err
