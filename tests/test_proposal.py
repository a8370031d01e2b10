"""Guides checked against the model (shape, support), and fit_guide on the shared training loop."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from models import linear_gaussian
from pyro_mi import GaussianEncoder, GuideDensity, ModelDensity, fit_guide
from pyro_mi.proposal import FIT_PRIOR_WEIGHT, same_support
from pyro_mi.training import train


def _gamma_model(x=None):
    g = pyro.sample("g", dist.Gamma(2.0, 1.0))
    return pyro.sample("x", dist.Normal(g, 1.0), obs=x)


@pytest.mark.parametrize("event", [(), (3,)])
def test_guide_with_wrong_event_shape(event):
    model, _, _, _ = linear_gaussian()  # z has shape (2,)
    d = ModelDensity(model, "x")

    def guide(x):
        pyro.sample("z", dist.Normal(torch.zeros(event), 1.0).to_event(len(event)))

    shape = rf"\({event[0] if event else ''},?\)"
    with pytest.raises(ValueError, match=rf"guide's site 'z' has shape {shape} per data point, the model's has \(2,\)"):
        GuideDensity(d, guide)


def test_guide_with_wrong_support():
    d = ModelDensity(_gamma_model, "x")

    def guide(x):
        pyro.sample("g", dist.Normal(1.0, 1.0))

    with pytest.raises(ValueError, match=r"guide's site 'g' has support Real\(\), the model's has GreaterThanEq"):
        GuideDensity(d, guide)


def test_guide_on_the_same_support_is_accepted():
    d = ModelDensity(_gamma_model, "x")

    def guide(x):  # LogNormal's support is positive, Gamma's nonnegative: the same up to 0
        pyro.sample("g", dist.LogNormal(0.5 + 0.0 * x, 1.0))

    x, _ = d.sample(3)
    z, log_q = GuideDensity(d, guide).rsample(x, 2)
    assert z.shape == (2, 3, 1) and torch.isfinite(log_q).all()


def test_same_support_rule():
    assert same_support(constraints.positive, constraints.greater_than(0.0))
    assert same_support(constraints.nonnegative, constraints.positive)
    assert same_support(constraints.half_open_interval(0.0, 1.0), constraints.unit_interval)
    assert not same_support(constraints.greater_than_eq(1.0), constraints.positive)
    assert same_support(constraints.interval(torch.zeros(3), 1.0), constraints.unit_interval)
    assert same_support(constraints.independent(constraints.real, 1), constraints.real)
    assert not same_support(constraints.positive, constraints.real)
    assert not same_support(constraints.interval(0.0, 1.0), constraints.interval(0.0, 2.0))
    assert not same_support(constraints.interval(torch.zeros(3), 1.0), constraints.interval(torch.zeros(2), 1.0))


# ------------------------------------------------- fit_guide on pyro_mi.training.train
def test_fit_guide_is_adam_with_a_cosine_learning_rate():
    model, _, _, _ = linear_gaussian()
    d = ModelDensity(model, "x")
    torch.manual_seed(0)
    q = GaussianEncoder(d, hidden_sizes=(8,))
    torch.manual_seed(1)
    losses = fit_guide(d, q, num_steps=20, batch_size=8, lr=1e-2, num_val=0, progress=False)
    # the same steps written out: a pool of 20 x 8 pairs, Adam, cosine decay to 0 over the steps, the
    # encoder mixed with the prior (weight FIT_PRIOR_WEIGHT) while it is fitted
    torch.manual_seed(0)
    ref = GaussianEncoder(d, hidden_sizes=(8,), prior_weight=FIT_PRIOR_WEIGHT)
    torch.manual_seed(1)
    x, z = d.sample(160)
    log_prior = d.log_prior(z, x)
    ref.standardize_from(x)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)
    expected = []
    for _ in range(20):
        idx = torch.randint(160, (8,))
        loss = -ref.log_prob(z[idx], {"x": x["x"][idx]}, log_prior=log_prior[idx]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        expected.append(loss.item())
    assert losses == expected


def test_fit_guide_stops_early_on_the_held_out_ba_estimate_and_keeps_the_best():
    model, _, _, true_mi = linear_gaussian()
    d = ModelDensity(model, "x")
    torch.manual_seed(0)
    q = GaussianEncoder(d, hidden_sizes=(16,))
    losses = fit_guide(d, q, num_steps=3000, num_val=512, eval_every=50, patience=3, progress=False)
    log = q.fit_log
    assert log.stopped_early and log.steps == len(losses) < 3000
    assert log.best_step == max(log.validation, key=lambda sv: sv[1])[0]  # the best evaluation's parameters
    assert log.steps - log.best_step == 3 * 50  # patience evaluations without improvement
    # the held-out BA estimate is a lower bound on these pairs' MI: below the truth, and not far
    assert true_mi - 0.3 < log.best_value < true_mi + 0.1


def test_fit_guide_trains_pyro_params_of_a_guide():
    model, _, _, _ = linear_gaussian()
    d = ModelDensity(model, "x")
    pyro.clear_param_store()

    def guide(x):
        loc = pyro.param("guide_loc", torch.full((2,), 3.0))
        pyro.sample("z", dist.Normal(loc + 0.0 * x[..., :2], 1.0).to_event(1))

    pyro.set_rng_seed(0)
    losses = fit_guide(d, GuideDensity(d, guide), num_steps=100, batch_size=32, lr=0.1, progress=False)
    assert len(losses) == 100 and losses[-1] < losses[0]
    assert pyro.param("guide_loc").abs().max() < 1.0  # pulled from 3 towards the prior mean 0


def test_train_refuses_an_unknown_schedule():
    p = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="lr_schedule must be 'constant', 'cosine' or 'plateau'"):
        train([p], lambda step: p.weight.sum(), max_steps=1, lr_schedule="linear", progress=False)


def test_plateau_schedule_halves_the_rate_and_says_why_it_stopped():
    """A validation score that never improves: the rate halves after patience // 3 + 1 = 3
    evaluations without improvement (ReduceLROnPlateau counts its own first call as one), and
    training stops after patience = 6."""
    p = torch.nn.Linear(1, 1)
    log = train([p], lambda step: p.weight.sum(), validate=lambda: 0.0, max_steps=100, lr=1.0, eval_every=1,
                patience=6, lr_schedule="plateau", progress=False)
    assert log.steps == 6 and log.stopped_early
    assert log.stop_reason == "patience: no better validation score in 6 evaluations (6 steps) after step 0"
    assert log.to_dict()["stop_reason"] == log.stop_reason
    # a constant gradient: each Adam step moves the weight by the learning rate
    moves = torch.tensor(log.objective).diff()
    torch.testing.assert_close(moves, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5]), atol=1e-5, rtol=0)


def test_min_delta_keeps_small_gains_but_stops_on_them():
    """Validation gains of 1e-4 per evaluation: with min_delta = 1e-3 they do not renew the
    patience (training stops after 4 evaluations) but the best, last, parameters are kept;
    with min_delta = 0 training runs to max_steps."""
    scores = iter([0.0] + [1e-4 * i for i in range(1, 50)])
    p = torch.nn.Linear(1, 1)
    log = train([p], lambda step: p.weight.sum(), validate=lambda: next(scores), max_steps=20, eval_every=1,
                patience=4, min_delta=1e-3, progress=False)
    assert log.steps == 4 and log.stopped_early and log.best_step == 4
    assert log.stop_reason.startswith("patience: no better by over 0.001 validation score in 4 evaluations")
    scores = iter([0.0] + [1e-4 * i for i in range(1, 50)])
    log = train([p], lambda step: p.weight.sum(), validate=lambda: next(scores), max_steps=20, eval_every=1,
                patience=4, progress=False)
    assert log.steps == 20 and not log.stopped_early
