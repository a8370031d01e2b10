"""Sample-only dual bounds (MINE, MINE-f, NWJ, InfoNCE, ξ) on correlated Gaussians (Belghazi et al. 2018, sec. 4.1)."""

import math

import pytest
import torch

from pyro_mi.bounds import dual
from pyro_mi.critics import JointCritic
from pyro_mi.samples import estimate_mi_samples



def gaussians(n, d, rho, seed=0):
    """x, z standard normal with corr(x_i, z_j) = δ_ij ρ; MI = -(d/2) log(1 - ρ²)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    z = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, z, -d / 2 * math.log(1 - rho**2)


SMALL = dict(hidden_sizes=(64, 64), lr=3e-3, batch_size=256, eval_every=50, progress=False)


# ----------------------------------------------------------------- the bounds as functions of scores
def test_score_bounds_identities():
    g = torch.Generator().manual_seed(0)
    t_pos, t_neg = torch.randn(100, generator=g) + 1, torch.randn(300, generator=g)
    dv = dual.dv_bound(t_pos, t_neg)
    nwj = dual.nwj_bound(t_pos, t_neg)
    # ξ = 1/e is NWJ / MINE-f; the optimal ξ = 1 / mean e^T gives DV (appendix eq. 2-4)
    assert torch.allclose(dual.xi_bound(t_pos, t_neg, -1.0), nwj, atol=1e-6)
    assert torch.allclose(dual.xi_bound(t_pos, t_neg, -dual.log_mean_exp(t_neg)), dv, atol=1e-6)
    for log_xi in torch.linspace(-4, 3, 15):
        assert dual.xi_bound(t_pos, t_neg, log_xi) <= dv + 1e-6
    scores = torch.randn(16, 16, generator=g, dtype=torch.float64) * 5
    scores.diagonal().add_(100.0)
    assert dual.infonce_bound(scores) <= math.log(16) + 1e-5
    assert dual.infonce_bound(scores) > math.log(16) - 1e-3


def test_mine_moving_average_gradient():
    critic = JointCritic(2, 2, (8,))
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(32, 2, generator=g), torch.randn(32, 2, generator=g)

    def grads(fn):
        critic.zero_grad()
        fn(critic(x, z), critic(x, z.roll(1, 0))).backward()
        return [p.grad.clone() for p in critic.parameters()]

    # rate 1: the naive minibatch gradient of DV (Belghazi et al. eq. 12); the value is always DV
    ema = dual.MovingAverage(1.0)
    val = ema.surrogate(critic(x, z), critic(x, z.roll(1, 0)))
    assert torch.allclose(val, dual.dv_bound(critic(x, z), critic(x, z.roll(1, 0))))
    for a, b in zip(grads(dual.MovingAverage(1.0).surrogate), grads(dual.dv_bound)):
        assert torch.allclose(a, b, atol=1e-6)
    # with a stale average the gradient's denominator is the average, not the batch mean
    ema = dual.MovingAverage(0.01)
    ema.log_value = torch.tensor(5.0)
    critic.zero_grad()
    t_neg = critic(x, z.roll(1, 0))
    ema.surrogate(critic(x, z), t_neg).backward()
    assert math.isclose(float(ema.log_value), float(torch.logaddexp(torch.tensor(5.0) + math.log(0.99),
                                                                   dual.log_mean_exp(t_neg.detach()) + math.log(0.01))),
                        rel_tol=1e-6)


def test_shift_pairs_and_per_point_values():
    ix, iz = dual.shift_pairs(7, 6, generator=torch.Generator().manual_seed(0))
    pairs = set(zip(ix.flatten().tolist(), iz.flatten().tolist()))
    assert len(pairs) == 42 and all(i != j for i, j in pairs)  # all off-diagonal pairs, once each
    # with all pairs, the mean of the per-point values is exactly the bound on all pairs
    x, z, _ = gaussians(40, 2, 0.5)
    critic = JointCritic(2, 2, (16,))
    with torch.no_grad():
        t = critic.pairwise(x, z)
        off = t[~torch.eye(40, dtype=torch.bool)]
        pos = t.diagonal()
        for method, expect in (("mine", dual.dv_bound(pos, off)), ("nwj", dual.nwj_bound(pos, off)),
                               ("mine-f", dual.nwj_bound(pos, off)), ("xi", dual.xi_bound(pos, off, 0.3))):
            v = dual.per_point_values(method, critic, x, z, log_xi=0.3, num_shifts=39)
            assert v.shape == (40,)
            assert torch.allclose(v.mean(), expect, atol=1e-5), method
        v = dual.per_point_values("infonce", critic, x, z, num_negatives=8)
        assert (v <= math.log(8) + 1e-6).all()


def test_evaluation_scores_in_chunks_of_bounded_size(monkeypatch):
    """The per-point values of a large sample are computed in chunks of at most CHUNK_EVALS pairs
    (memory that does not grow with n), and equal the unchunked values."""
    x, z, _ = gaussians(500, 2, 0.5)
    critic = JointCritic(2, 2, (16,))
    seen = []

    def counted(a, b):
        seen.append(a.shape[:-1].numel())
        return critic(a, b)

    with torch.no_grad():
        whole = dual.per_point_values("mine", counted, x, z, num_shifts=30, generator=torch.Generator().manual_seed(0))
        assert max(seen) == 500 * 30
        monkeypatch.setattr(dual, "CHUNK_EVALS", 64)
        seen.clear()
        chunked = dual.per_point_values("mine", counted, x, z, num_shifts=30, generator=torch.Generator().manual_seed(0))
    assert max(seen) == 64
    torch.testing.assert_close(chunked, whole)


def test_jackknife_values_match_deleting_each_sample():
    """The closed-form delete-one values equal the bound recomputed on all pairs without sample k."""
    n = 12
    x, z, _ = gaussians(n, 2, 0.7, seed=3)
    critic = JointCritic(2, 2, (16,)).double()
    x, z = x.double(), z.double()
    with torch.no_grad():
        t = critic.pairwise(x, z)
        for method, lx in (("mine", None), ("xi", 0.4)):
            def bound(keep):
                sub = t[keep][:, keep]
                pos, off = sub.diagonal(), sub[~torch.eye(len(keep), dtype=torch.bool)]
                return dual.dv_bound(pos, off) if lx is None else dual.xi_bound(pos, off, lx)

            full = bound(list(range(n)))
            minus = torch.stack([bound([i for i in range(n) if i != k]) for k in range(n)])
            pseudo = n * full - (n - 1) * minus
            v = dual.per_point_values(method, critic, x, z, log_xi=lx, num_shifts=n - 1)
            assert torch.allclose(v, pseudo - pseudo.mean() + full, atol=1e-9), method
            assert torch.allclose(v.mean(), full, atol=1e-12)


class SpikyCritic(torch.nn.Module):
    """T = 3 x_0 z_0: e^T under the product of marginals is dominated by a few pairs."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, z):
        return 3 * (x[..., 0] * z[..., 0]) + 0 * self.unused


def test_heavy_tails_warn_and_too_few_test_samples_refused():
    x, z, _ = gaussians(500, 2, 0.8)
    r = estimate_mi_samples(x, z, "nwj", critic=SpikyCritic(), max_steps=0, preprocess="standardize", progress=False)
    assert any(w.startswith("heavy tails") for w in r.warnings), r.warnings
    assert r.lower_stderr > 0.1
    # the case: 10 samples gave 12.66 ± 0.84 against a true MI of 1.02
    with pytest.raises(ValueError, match=f"fewer than {dual.MIN_TEST_SAMPLES}.*at least 500 samples in all"):
        estimate_mi_samples(x[:10], z[:10], "mine", progress=False)
    with pytest.raises(ValueError, match="at least 1000 samples in all"):
        estimate_mi_samples(x, z, "mine", test_fraction=0.1, progress=False)
    with pytest.raises(ValueError, match="50 training"):
        estimate_mi_samples(x, z, "mine", test_fraction=0.0, val_fraction=0.9, progress=False)


# ----------------------------------------------------------------- correlated Gaussians, d = 2
@pytest.mark.parametrize("method", ["mine", "mine-f", "nwj", "xi", "infonce"])
def test_gaussian_d2_close_to_truth(method):
    x, z, mi = gaussians(4000, 2, 0.8)  # MI = 1.022 nats
    r = estimate_mi_samples(x, z, method, max_steps=400, **SMALL)
    test_fraction = dual.SPLITS.get(method, dual.SPLITS[None])[1]  # InfoNCE holds out 0.4, the others 0.2
    assert r.upper is None and r.num_data == 4000 * test_fraction and r.settings["num_samples"] == 4000
    # a lower bound: below truth within 3 standard errors, and within 0.15 nats of it
    assert r.lower <= mi + 3 * r.lower_stderr
    assert r.lower >= mi - 0.15, (r.lower, mi)
    assert 0.01 < r.lower_stderr < 0.1


def test_dv_above_mine_f_for_the_same_critic_and_mine_f_equals_nwj():
    x, z, mi = gaussians(3000, 2, 0.8)
    r = estimate_mi_samples(x, z, "mine", max_steps=300, **SMALL)
    critic = r.diagnostics["critic"]
    xs, zs = (x - x.mean(0)) / x.std(0), (z - z.mean(0)) / z.std(0)
    with torch.no_grad():
        vals = {m: dual.per_point_values(m, critic, xs, zs, generator=torch.Generator().manual_seed(0)).mean()
                for m in ("mine", "mine-f", "nwj")}
        vals["xi"] = dual.per_point_values("xi", critic, xs, zs, log_xi=-1.0,
                                           generator=torch.Generator().manual_seed(0)).mean()
    assert vals["mine"] >= vals["mine-f"]
    assert torch.allclose(vals["mine-f"], vals["nwj"]) and torch.allclose(vals["nwj"], vals["xi"], atol=1e-6)
    # same seed, same objective: the fitted MINE-f and NWJ runs are identical
    a = estimate_mi_samples(x, z, "mine-f", max_steps=100, **SMALL)
    b = estimate_mi_samples(x, z, "nwj", max_steps=100, **SMALL)
    assert a.lower == b.lower


def test_infonce_at_most_log_batch_size():
    x, z, mi = gaussians(3000, 20, 0.9)  # MI = 16.6 nats >> log 32
    r = estimate_mi_samples(x, z, "infonce", max_steps=300, eval_negatives=32, **{**SMALL, "batch_size": 32})
    assert r.settings["num_negatives"] == 32
    assert (r.lower_per_point <= math.log(32) + 1e-5).all()
    assert r.lower <= math.log(32)
    assert r.lower > math.log(32) - 0.6  # saturates near log K (Brekelmans et al. 2022, Fig. 3a)
    # by default the test split's K is all 1200 test samples here (K = 300, all validation samples,
    # scores higher on validation): the same critic then passes the training batch's ceiling
    big = estimate_mi_samples(x, z, "infonce", max_steps=300, **{**SMALL, "batch_size": 32})
    assert big.settings["num_negatives"] == 1200
    assert math.log(32) + 1 < big.lower <= math.log(1200)


def test_xi_fixed_and_optimised():
    x, z, mi = gaussians(3000, 2, 0.8)
    fixed = estimate_mi_samples(x, z, "xi", xi=0.5, max_steps=100, **SMALL)
    assert fixed.settings["xi"] == pytest.approx(0.5) and not fixed.settings["xi_optimised"]
    opt = estimate_mi_samples(x, z, "xi", max_steps=300, **SMALL)
    assert opt.settings["xi_optimised"] and opt.settings["xi"] != pytest.approx(1 / math.e)
    assert opt.lower <= mi + 3 * opt.lower_stderr


def test_all_pairs_negatives_and_bad_options():
    x, z, mi = gaussians(2000, 2, 0.8)
    r = estimate_mi_samples(x, z, "mine", negatives="all", max_steps=200, **{**SMALL, "batch_size": 64})
    assert r.settings["negatives"] == "all"
    assert abs(r.lower - mi) < 0.2
    with pytest.raises(ValueError, match="negatives"):
        estimate_mi_samples(x, z, "mine", negatives="pairs", **SMALL)
    with pytest.raises(ValueError, match="xi must be a positive"):
        estimate_mi_samples(x, z, "xi", xi=-1.0, **SMALL)
    with pytest.raises(ValueError, match="unknown method"):
        estimate_mi_samples(x, z, "kraskov")


def test_evaluating_on_training_samples_warns():
    x, z, _ = gaussians(500, 2, 0.8)
    with pytest.warns(UserWarning, match="optimistic"):
        r = estimate_mi_samples(x, z, "nwj", test_fraction=0.0, max_steps=20, **SMALL)
    assert r.settings["evaluated_on"].startswith("training samples")
    assert any("optimistic" in w for w in r.warnings)


def test_device_and_dtype_follow_the_data():
    x, z, _ = gaussians(500, 2, 0.5)
    r = estimate_mi_samples(x.double(), z.double(), "mine", max_steps=10, **SMALL)
    assert r.lower_per_point.dtype == torch.float64
    assert next(r.diagnostics["critic"].parameters()).dtype == torch.float64


# ----------------------------------------------------------------- correlated Gaussians, d = 20
@pytest.mark.slow
@pytest.mark.parametrize("method,tol", [("mine", 0.6), ("infonce", 0.6), ("nwj", 0.9)])
def test_gaussian_d20(method, tol):
    x, z, mi = gaussians(20000, 20, 0.5)  # MI = 2.877 nats
    r = estimate_mi_samples(x, z, method, max_steps=1500, hidden_sizes=(128, 128), lr=1e-3,
                            batch_size=256, progress=False)
    assert r.lower <= mi + 3 * r.lower_stderr
    assert r.lower >= mi - tol, (method, r.lower, mi)


# ----------------------------------------------------------------- preprocessing, critics, heavy tails
@pytest.mark.parametrize("kind", dual.PREPROCESS)
def test_preprocess_is_strictly_increasing_per_coordinate(kind):
    """MI is unchanged by a strictly increasing map of each coordinate; check that on training
    values with ties and on fresh values outside the training range."""
    torch.manual_seed(0)  # StudentT.sample takes no generator
    g = torch.Generator().manual_seed(0)
    train = torch.cat([torch.distributions.StudentT(1.0).sample((500, 3)), torch.zeros(50, 3)])  # Cauchy + ties
    train[:, 2] = train[:, 2].round()  # a coordinate with many ties
    f = dual.preprocessor(kind, train)
    fresh = torch.sort(torch.cat([train, 1e3 * torch.randn(20, 3, generator=g)]), 0).values.unique_consecutive(dim=0)
    for j in range(3):
        col = torch.sort(fresh[:, j].unique()).values
        out = f(col[:, None].expand(-1, 3).contiguous())[:, j]
        assert torch.all(out[1:] > out[:-1]), (kind, j)
    if kind == "gaussianize":
        u = f(torch.distributions.StudentT(1.0).sample((20000, 3)))
        # fresh draws beyond the 550 training values are mapped logarithmically: over seeds 0-7 the
        # mean was -0.05..0.09 and the std 1.02..1.16
        assert abs(float(u[:, 0].mean())) < 0.1 and abs(float(u[:, 0].std()) - 1) < 0.2
    if kind == "robust":  # far samples are pulled in logarithmically
        assert float(f(torch.full((1, 3), 1e6)).max()) < 20
    with pytest.raises(ValueError, match="preprocess must be one of"):
        dual.preprocessor("rank", train)


def test_joint_critic_pairwise_is_the_broadcast_call():
    c = JointCritic(3, 2, hidden_sizes=(16, 8))
    x, z = torch.randn(5, 3), torch.randn(7, 2)
    torch.testing.assert_close(c.pairwise(x, z), c(x[:, None], z[None]))


def student_t(n, nu, seed=0):
    """x, z (n, 1) from a bivariate Student-t with identity dispersion and ν degrees of freedom
    (dependent only through the shared scale) and its MI h(x) + h(z) - h(x, z), where a d-dim
    t has h = log[(νπ)^(d/2) Γ(ν/2) / Γ((ν+d)/2)] + (ν+d)/2 [ψ((ν+d)/2) - ψ(ν/2)]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.distributions.Chi2(torch.tensor(float(nu))).sample((n, 1)) / nu
    xz = torch.randn(n, 2, generator=g) / w.sqrt()
    nu = torch.tensor(float(nu), dtype=torch.float64)

    def h(d):
        return (d / 2 * torch.log(nu * math.pi) + torch.lgamma(nu / 2) - torch.lgamma((nu + d) / 2)
                + (nu + d) / 2 * (torch.digamma((nu + d) / 2) - torch.digamma(nu / 2)))

    return xz[:, :1], xz[:, 1:], float(2 * h(1) - h(2))


def test_student_t_mi_formula():
    assert student_t(10, 1)[2] == pytest.approx(0.2242, abs=1e-4)  # bmi's student-identity-1-1-1


@pytest.mark.parametrize("method", ["mine", "nwj", "infonce"])
def test_cauchy_tails_give_a_bound_near_truth(method):
    """Student-t with 1 degree of freedom: the old version gave MINE -11.2 and NWJ -35 nats
    (true 0.224); the robust map (asinh of the median/IQR-scaled values) keeps it a bound."""
    torch.manual_seed(0)
    x, z, mi = student_t(4000, 1)
    r = estimate_mi_samples(x, z, method, max_steps=600, **SMALL)
    assert r.lower <= mi + 3 * r.lower_stderr
    assert r.lower >= mi - 0.12, (method, r.lower, r.warnings)


def test_negative_bound_warns_with_the_tail_share():
    """A critic that does not carry over to held-out samples: on independent Cauchy samples,
    T = x z puts nearly all of e^T on a few pairs, and the bound is far below 0."""
    torch.manual_seed(0)
    x, z = torch.distributions.StudentT(1.0).sample((2, 1000, 1)).double()
    r = estimate_mi_samples(x, z, "nwj", critic=SpikyCritic(), max_steps=0, progress=False)
    assert r.lower < -1
    warn = [w for w in r.warnings if w.startswith("the bound is negative")]
    assert warn and "top 1% of the negative pairs carry" in warn[0], r.warnings


def test_stop_reason_and_infonce_test_k():
    x, z, _ = gaussians(2000, 2, 0.8)
    r = estimate_mi_samples(x, z, "infonce", max_steps=30, **{**SMALL, "batch_size": 64})
    assert r.settings["stop_reason"] == "max_steps reached" and r.settings["steps"] == 30
    assert r.settings["num_negatives"] in (64, 800)  # the batch size or all 800 test samples
    r = estimate_mi_samples(x, z, "infonce", max_steps=30, eval_negatives=100, **{**SMALL, "batch_size": 64})
    assert r.settings["num_negatives"] == 100 and r.lower <= math.log(100)
    r = estimate_mi_samples(x, z, "mine", critic=SpikyCritic(), max_steps=5000, patience=2,
                            **{**SMALL, "eval_every": 5})  # its parameter is unused: no score ever improves
    assert r.settings["stop_reason"].startswith("patience: no better validation score in 2 evaluations (10 steps)")
    with pytest.raises(ValueError, match="critic must be a module or one of"):
        estimate_mi_samples(x, z, "mine", critic="bilinear", **SMALL)


def test_auto_critic_keeps_the_higher_validation_bound():
    """InfoNCE's default critic "auto" fits a separable and a joint critic and keeps the one with
    the higher validation bound; a named critic fits only itself, and without a validation split
    "auto" fits only its first (separable) candidate."""
    x, z, mi = gaussians(2000, 2, 0.8)
    r = estimate_mi_samples(x, z, "infonce", max_steps=100, **SMALL)
    tried = r.settings["critics_tried"]
    assert set(tried) == {"SeparableCritic", "JointCritic"} and all(math.isfinite(v) for v in tried.values())
    assert r.settings["critic"] == max(tried, key=tried.get)
    assert type(r.diagnostics["critic"]).__name__ == r.settings["critic"]
    assert r.diagnostics["training"].best_value == tried[r.settings["critic"]]
    assert r.lower <= mi + 3 * r.lower_stderr
    one = estimate_mi_samples(x, z, "infonce", critic="joint", max_steps=100, **SMALL)
    assert list(one.settings["critics_tried"]) == ["JointCritic"]
    assert one.diagnostics["critic"].net[0].out_features == SMALL["hidden_sizes"][0]
    auto_joint = [c for c in dual.default_critics("infonce", 2, 2, (64, 64), 8) if type(c).__name__ == "JointCritic"]
    assert auto_joint[0].net[0].out_features == dual.AUTO_JOINT_HIDDEN[0]
    no_val = estimate_mi_samples(x, z, "infonce", max_steps=50, val_fraction=0.0, **SMALL)
    assert list(no_val.settings["critics_tried"]) == ["SeparableCritic"]
    assert list(estimate_mi_samples(x, z, "mine", max_steps=50, **SMALL).settings["critics_tried"]) == ["JointCritic"]
