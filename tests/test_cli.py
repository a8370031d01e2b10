"""The `pyro-mi estimate` contract: JSON fields, model files, examples, errors."""

import json
import math
import textwrap

import pytest
import torch

from models import beta_binomial, two_sites
from pyro_mi import cli
from pyro_mi.cli import ESTIMATE_OPTIONS, METHODS, main, method_options, strict_json

MODEL_FILE = textwrap.dedent(
    """
    import pyro, pyro.distributions as dist

    def beta_binomial(x=None):
        p = pyro.sample("p", dist.Beta(2.0, 3.0))
        return pyro.sample("x", dist.Binomial(10, p), obs=x)

    def two_sites(x=None):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        return pyro.sample("x", dist.Normal(a + 2 * b, 0.7), obs=x)

    def guide(x):
        pyro.sample("a", dist.Normal(0.2 * x, 0.4))
        pyro.sample("b", dist.Normal(0.4 * x, 0.3))
    """
)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(MODEL_FILE)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_contract_and_brackets(capsys, model_file):
    code, out, _ = run(capsys, "estimate", f"{model_file}:beta_binomial", "--obs", "x", "--method", "iwae",
                       "--num-particles", "100", "--num-data", "500", "--fit-steps", "200", "--json")
    assert code == 0
    res = json.loads(out)
    for key in ("method", "lower", "upper", "lower_stderr", "upper_stderr", "num_data", "seconds", "true_mi"):
        assert key in res
    assert res["method"] == "iwae" and res["num_data"] == 500 and res["true_mi"] is None
    _, truth = beta_binomial()
    assert res["lower"] - 3 * res["lower_stderr"] <= truth <= res["upper"] + 3 * res["upper_stderr"]


def test_two_sites_with_guide_file(capsys, model_file):
    code, out, _ = run(capsys, "estimate", f"{model_file}:two_sites", "--obs", "x", "--guide", f"{model_file}:guide",
                       "--method", "ba", "--num-data", "400", "--num-particles", "10", "--json")
    assert code == 0
    res = json.loads(out)
    _, truth = two_sites()
    assert res["lower"] - 3 * res["lower_stderr"] <= truth <= res["upper"] + 3 * res["upper_stderr"]


def test_same_seed_same_json(capsys, model_file):
    args = ("estimate", f"{model_file}:two_sites", "--obs", "x", "--num-data", "16", "--num-particles", "5",
            "--fit-steps", "10", "--seed", "7", "--json")
    a = json.loads(run(capsys, *args)[1])
    b = json.loads(run(capsys, *args)[1])
    assert (a["lower"], a["upper"]) == (b["lower"], b["upper"])


def test_table_output(capsys):
    code, out, _ = run(capsys, "estimate", "--example", "linear-vae", "--num-data", "8", "--num-particles", "5",
                       "--fit-steps", "5")
    assert code == 0 and "lower (nats)" in out and "true MI" in out


def test_example_json_reports_true_mi(capsys):
    code, out, _ = run(capsys, "estimate", "--example", "linear-vae", "--num-data", "8", "--num-particles", "5",
                       "--fit-steps", "5", "--json")
    assert json.loads(out)["true_mi"] == pytest.approx(23.1028, abs=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (("estimate", "nofile.py:model", "--obs", "x"), "target file 'nofile.py' does not exist"),
        (("estimate", "{f}:missing", "--obs", "x"), "has no function 'missing'"),
        (("estimate", "{f}:two_sites", "--obs", "y"), "observed site 'y' is not a sample site"),
        (("estimate", "{f}:two_sites"), "--obs is required"),
        (("estimate", "{f}", "--obs", "x"), "must be 'path/to/file.py:function'"),
        (("estimate", "--example", "nope"), "unknown example 'nope'"),
        (("estimate", "not_a_module_xyz:model", "--obs", "x"), "cannot import module"),
    ],
)
def test_errors_are_one_line(capsys, model_file, argv, message):
    argv = [a.replace("{f}", str(model_file)) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2 and message in err and "Traceback" not in err


# ----------------------------------------------------------------- options declared per method
@pytest.mark.parametrize(
    "method, flags",
    [
        ("iwae", ["--max-steps", "5"]),
        ("iwae", ["--num-steps", "3", "--adapt", "none"]),
        ("ais", ["--num-particles", "5"]),
        ("infonce", ["--num-chains", "4"]),
        ("ba", ["--checkpoint", "ckpt.pt"]),
    ],
)
def test_a_flag_that_does_not_apply_is_an_error(capsys, model_file, method, flags):
    code, out, err = run(capsys, "estimate", f"{model_file}:two_sites", "--obs", "x", "--method", method, *flags)
    wrong = [f for f in flags if f.startswith("--")]
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"{', '.join(wrong)} do{'es' if len(wrong) == 1 else ''} not apply to --method {method}" in err
    takes = ", ".join("--" + k.replace("_", "-") for k in method_options(method))
    assert err.strip().endswith(f"its flags are: {takes}")


def test_method_options_come_from_the_declarations():
    assert set(method_options("iwae")) == {"num_particles", "points_per_block"}
    assert {"num_particles", "max_steps", "batch_size", "lr"} <= set(method_options("infonce"))
    assert {"num_chains", "num_steps", "adapt", "checkpoint", "save_chains"} <= set(method_options("ais"))
    assert "num_particles" not in method_options("ais")
    # every flag applies to some method
    used = {k for m in METHODS for k in method_options(m)}
    assert used == {flag.lstrip("-").replace("-", "_") for flag, _ in ESTIMATE_OPTIONS}


def test_infonce_honours_max_steps_batch_size_and_lr(capsys):
    code, out, _ = run(capsys, "estimate", "--example", "linear-vae", "--method", "infonce", "--num-data", "32",
                       "--num-particles", "4", "--max-steps", "5", "--batch-size", "8", "--lr", "0.01", "--json",
                       "--no-progress")
    assert code == 0
    r = json.loads(out)
    assert r["steps"] <= 5 and r["max_steps"] == 5 and r["batch_size"] == 8


# ----------------------------------------------------------------- strict JSON
class _NaNResult:
    def to_dict(self):
        return {"lower": float("nan"), "interval_95": [float("-inf"), 1.0], "diagnostics": {"ess": float("inf")},
                "warnings": ["w"]}


def test_json_is_strict(capsys, model_file, monkeypatch):
    assert strict_json({"a": math.nan, "b": (math.inf, 2.0)}) == '{"a": null, "b": [null, 2.0]}'
    monkeypatch.setattr(cli, "estimate_mi", lambda *a, **k: _NaNResult())
    code, out, _ = run(capsys, "estimate", f"{model_file}:two_sites", "--obs", "x", "--json")
    assert code == 0
    r = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} is not strict JSON"))
    assert r == {"lower": None, "interval_95": [None, 1.0], "diagnostics": {"ess": None}, "warnings": ["w"]}


def test_threads_flag(capsys, monkeypatch):
    before = torch.get_num_threads()
    try:
        code, _, err = run(capsys, "--threads", "0", "estimate", "--example", "linear-vae", "--method", "ba")
        assert code == 2 and "--threads must be >= 1" in err
        code, _, _ = run(capsys, "--threads", "2", "estimate", "--example", "linear-vae", "--method", "ba",
                         "--num-data", "8", "--fit-steps", "2", "--json")
        assert code == 0 and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # default: one thread
        code, _, _ = run(capsys, "estimate", "--example", "linear-vae", "--method", "ba", "--num-data", "8",
                         "--fit-steps", "2", "--json")
        assert code == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


DATA_MODELS = textwrap.dedent(
    """
    import torch, pyro, pyro.distributions as dist

    W = torch.tensor([[1.0, 0.5], [0.0, 2.0], [1.5, -1.0]])

    def plate_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            return pyro.sample("x", dist.Normal(z @ W.T, 0.5).to_event(1), obs=x)

    def design_model(design, y=None):
        theta = pyro.sample("theta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        return pyro.sample("y", dist.Normal(theta @ design.T, 1.0).to_event(1), obs=y)
    """
)


def _linear_mi(W, noise):
    W = torch.as_tensor(W, dtype=torch.float64)
    return 0.5 * float(torch.logdet(torch.eye(W.shape[1], dtype=torch.float64) + W.T @ W / noise**2))


def test_data_and_model_arg_files(capsys, tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "data_models.py"
    path.write_text(DATA_MODELS)
    np.savez(tmp_path / "x.npz", x=np.zeros((10, 3), dtype=np.float32))  # a template: only its shape is used
    design = np.array([[1.0, 0.0], [0.5, 2.0], [0.0, 1.0]])
    np.save(tmp_path / "design.npy", design)
    W = [[1.0, 0.5], [0.0, 2.0], [1.5, -1.0]]
    for argv, truth in (
        (("estimate", f"{path}:plate_model", "--obs", "x", "--data", str(tmp_path / "x.npz")), _linear_mi(W, 0.5)),
        (("estimate", f"{path}:design_model", "--obs", "y", "--model-arg", f"design={tmp_path / 'design.npy'}"),
         _linear_mi(design, 1.0)),
    ):
        code, out, _ = run(capsys, *argv, "--method", "iwae", "--num-particles", "200", "--num-data", "400",
                           "--fit-steps", "300", "--json")
        assert code == 0
        r = json.loads(out)
        # IWAE brackets these points' MI; the population MI lies within 4 se of either side
        assert r["lower"] - 4 * r["lower_stderr"] <= truth <= r["upper"] + 4 * r["upper_stderr"]
    np.savez(tmp_path / "wrong.npz", w=np.zeros((10, 3)))
    for argv, message in (
        (("--data", str(tmp_path / "wrong.npz"), f"{path}:plate_model", "--obs", "x"),
         "has no array named after an argument of the model (x) or an observed site (x); its arrays are: w"),
        (("--model-arg", "design", f"{path}:design_model", "--obs", "y"), "--model-arg takes NAME=FILE"),
        (("--model-arg", f"design={tmp_path / 'nope.npy'}", f"{path}:design_model", "--obs", "y"), "does not exist"),
    ):
        code, _, err = run(capsys, "estimate", *argv)
        assert code == 2 and message in err
