"""Tests of the vectorised HMC kernel and annealing schedules (pyro_mi.samplers)."""

import math

import pytest
import torch

from pyro_mi.samplers import (StepSizeAdapter, anneal, freeze, get_schedule, hmc, linear_schedule,
                              pilot_step_sizes, search_step_size, sigmoid_schedule)


# pi0 = N(0, I), gamma = N(m, s^2 I) unnormalised: pi_beta is Gaussian with
# precision (1 - beta) + beta / s^2 and mean beta m / s^2 / precision.
M, S = 2.0, 0.5


def gaussian_components(z):
    lb = -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)
    lt = -0.5 * (((z - M) / S) ** 2).sum(-1) + 3.0
    return lb, lt


def annealed_moments(beta):
    prec = (1 - beta) + beta / S**2
    return beta * M / S**2 / prec, 1 / prec


def test_kernel_leaves_annealed_gaussian_invariant():
    torch.manual_seed(0)
    beta = 0.3
    mean, var = annealed_moments(beta)
    z = mean + math.sqrt(var) * torch.randn(4000, 1, 2)
    st = hmc.init(gaussian_components, z)
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        st, info = hmc.step(st, gaussian_components, torch.tensor(beta), 0.4, 3, g)
    # 8000 draws: stderr of the mean ~0.006, of the variance ~0.004 (nats^0 units)
    assert abs(st.z.mean().item() - mean) < 0.03
    assert abs(st.z.var().item() - var) < 0.03
    assert 0.5 < info.accept_prob.mean().item() <= 1.0
    # cached components and gradients match a fresh evaluation at the final state
    lb, lt, gb, gt = hmc.evaluate(gaussian_components, st.z)
    torch.testing.assert_close(st.log_base, lb)
    torch.testing.assert_close(st.grad_target, gt)


def test_one_components_call_per_leapfrog_step():
    calls = []

    def counted(z):
        calls.append(z.shape)
        return gaussian_components(z)

    st = hmc.init(counted, torch.zeros(5, 3, 2))
    for L in (1, 4):
        calls.clear()
        st, _ = hmc.step(st, counted, torch.full((5, 3), 0.5), 0.1, L)
        assert len(calls) == L


def test_step_is_a_pure_function_of_state_and_generator():
    st = hmc.init(gaussian_components, torch.randn(6, 2, 2, generator=torch.Generator().manual_seed(1)))
    a = hmc.step(st, gaussian_components, 0.5, torch.full((2,), 0.3), 2, torch.Generator().manual_seed(7))
    b = hmc.step(st, gaussian_components, 0.5, torch.full((2,), 0.3), 2, torch.Generator().manual_seed(7))
    for u, v in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(u, v)
    assert set(hmc.HMCState._fields) == {"z", "log_base", "log_target", "grad_base", "grad_target"}


def test_step_size_adapters():
    eps = torch.full((3, 2), 1e-3)
    accept = torch.tensor([[1.0, 0.1], [1.0, 0.1], [0.2, 0.1]])
    up = StepSizeAdapter("multiplicative", 1.02).update(eps, accept)  # the paper's rule, per chain
    torch.testing.assert_close(up, torch.tensor([[1.02e-3, 1e-3 / 1.02]] * 2 + [[1e-3 / 1.02] * 2]))
    pooled = StepSizeAdapter("multiplicative", 1.02, pool_chains=True).update(eps, accept)
    assert torch.equal(pooled[0], pooled[2])  # one step size per data point
    scaled = StepSizeAdapter("scaling", 4.0, target_accept=0.65).update(eps, torch.full((3, 2), 0.65))
    torch.testing.assert_close(scaled, eps)  # at the target: no change
    low = StepSizeAdapter("scaling", 4.0).update(eps, torch.zeros(3, 2))
    assert bool((low < eps).all()) and bool((low >= eps / 4).all())
    assert bool((StepSizeAdapter(bounds=(1e-2, 1.0)).update(eps, accept) == 1e-2).all())
    with pytest.raises(ValueError, match="rule"):
        StepSizeAdapter("dual")


def test_non_finite_region_rejected_per_chain_and_counted():
    # log gamma = -inf for z > 0.5: chains started inside never leave it, others unaffected
    def walled(z):
        lb, lt = gaussian_components(z)
        return lb, torch.where((z > 0.5).any(-1), torch.full_like(lt, -math.inf), lt)

    torch.manual_seed(1)
    z = -torch.rand(200, 2, 1) - 0.1
    st = hmc.init(walled, z)
    ndiv = 0
    for _ in range(20):
        st, info = hmc.step(st, walled, torch.tensor(1.0), 1.0, 5)
        ndiv += int(info.diverging.sum())
    assert ndiv > 0
    assert bool(torch.isfinite(st.z).all()) and bool((st.z <= 0.5).all())
    assert bool(torch.isfinite(st.log_target).all())


def test_nan_in_one_chain_does_not_touch_others():
    def comps(z):
        lb, lt = gaussian_components(z)
        return lb, torch.where(z[..., 0] > 100, torch.full_like(lt, math.nan), lt)

    z = torch.zeros(2, 1, 2)
    z[0] = 200.0
    st = hmc.init(comps, z)
    st2, info = hmc.step(st, comps, torch.tensor(0.5), 0.1, 2, torch.Generator().manual_seed(3))
    assert bool(info.diverging[0].all()) and not bool(info.diverging[1].any())
    torch.testing.assert_close(st2.z[0], z[0])


def test_init_rejects_bad_input():
    with pytest.raises(ValueError, match="num_chains, num_data, dim"):
        hmc.init(gaussian_components, torch.zeros(3, 2))
    st = hmc.init(gaussian_components, torch.zeros(2, 3, 1))
    with pytest.raises(ValueError, match="step_size"):
        anneal(gaussian_components, st.z, torch.zeros(2, dtype=torch.bool), linear_schedule(3), torch.ones(3, 3), 1)
    with pytest.raises(ValueError, match="positive"):
        anneal(gaussian_components, st.z, torch.zeros(2, dtype=torch.bool), linear_schedule(3), -1.0, 1)


def test_search_and_freeze():
    st = hmc.init(gaussian_components, torch.zeros(50, 3, 2))
    eps = search_step_size(gaussian_components, st, 0.0, 1e-3, torch.Generator().manual_seed(0))
    assert eps.shape == (3,) and bool((eps > 1e-2).all())  # grows from a tiny start, one per data point
    table = freeze(torch.tensor([2, 6]), torch.tensor([[0.0, 1.0], [2.0, 3.0]]), 9)
    torch.testing.assert_close(table.log()[:, 0], torch.tensor([0, 0, 0, 0.5, 1, 1.5, 2, 2, 2.0]))
    torch.testing.assert_close(table.log()[:, 1], table.log()[:, 0] + 1)


def test_pilot_step_sizes_reach_the_target_acceptance():
    # frozen pilot step sizes give the main chains an acceptance near the pilot's target (0.9)
    betas = linear_schedule(50)
    g = torch.Generator().manual_seed(0)
    table = pilot_step_sizes(gaussian_components, torch.randn(8, 4, 2, generator=g), betas, 0.01, 3, g)
    assert table.shape == (51, 4)
    assert float(table[-1].mean()) < float(table[1].mean())  # the target is narrower than pi0
    acc = []
    anneal(gaussian_components, torch.randn(64, 4, 2, generator=g), torch.zeros(64, dtype=torch.bool), betas,
           table, 3, g, on_step=lambda s, i: i.hmc is not None and acc.append(float(i.hmc.accept_prob.mean())))
    assert 0.75 < sum(acc) / len(acc) < 0.98


def test_schedules():
    lin = linear_schedule(4)
    torch.testing.assert_close(lin, torch.tensor([0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    for radius in (1.0, 4.0, 8.0):
        sig = sigmoid_schedule(50, radius)
        assert sig[0] == 0 and sig[-1] == 1 and bool((sig[1:] > sig[:-1]).all())
    # a larger radius spends more steps near the ends
    assert sigmoid_schedule(50, 8.0)[5] < sigmoid_schedule(50, 1.0)[5]
    torch.testing.assert_close(get_schedule("sigmoid", 1), torch.tensor([0.0, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="schedule"):
        get_schedule("cosine", 10)
    with pytest.raises(ValueError, match="num_steps"):
        get_schedule("linear", 0)
    with pytest.raises(ValueError, match="non-decreasing"):
        get_schedule([0.0, 0.7, 0.5, 1.0], 3)


def test_anneal_log_normaliser_of_gaussians():
    # log Z_T / Z_0 = log of the integral of exp(lt) = 3 + log(2 pi S^2) (2-dim)
    torch.manual_seed(0)
    truth = 3.0 + math.log(2 * math.pi * S**2)
    C = 256
    z0 = torch.randn(C, 1, 2)
    zr = M + S * torch.randn(C, 1, 2)
    rev = torch.tensor([False] * C + [True] * C)
    incs = []
    g = torch.Generator().manual_seed(0)
    table = pilot_step_sizes(gaussian_components, torch.randn(8, 1, 2, generator=g), linear_schedule(100), 0.3, 3, g)
    st = anneal(gaussian_components, torch.cat([z0, zr]), rev, linear_schedule(100), table, 3, g,
                on_step=lambda s, i: incs.append(i))
    lw = st.log_weights.squeeze(1)
    elbo = lw[:C].mean().item()
    eubo = lw[C:].mean().item()
    assert elbo < truth + 0.02 and eubo > truth - 0.02
    # perfect transitions would give a gap of (KL + reverse KL) / T = 22 / 100 nats (Prop. 3.1)
    assert eubo - elbo < 0.45
    assert len(incs) == 100 and incs[-1].hmc is None and incs[0].hmc.accept_prob.shape == (2 * C, 1)
    torch.testing.assert_close(sum(i.log_weight_increment for i in incs), st.log_weights)
