"""Timestep sampling (fluxtrain.timesteps): each method's distribution against an
analytic reference (Kolmogorov-Smirnov), flux_shift's dependence on resolution,
determinism."""

import math

import numpy as np
import pytest
import torch

scipy_stats = pytest.importorskip("scipy.stats")

from fluxtrain.timesteps import (METHODS, flux_shift_mu, sample_timesteps, shift_timesteps,
                                 tokens_for_latent)

N = 20000


def draw(method, seed=0, **kw):
    return sample_timesteps(method, N, torch.Generator().manual_seed(seed), **kw).double().numpy()


def logit(t):
    return np.log(t) - np.log1p(-t)


def ks_p(samples, cdf):
    return scipy_stats.kstest(samples, cdf).pvalue


# Every sigmoid-normal method is logit-normal with a shifted mean:
# logit(s) ~ Normal(mean + log(S), std). The references below use that fact, not the code's formulas.

@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (-0.5, 1.4)])
def test_logit_normal_matches_normal_in_logit_space(mean, std):
    s = draw("logit_normal", mean=mean, std=std)
    assert ks_p(logit(s), scipy_stats.norm(mean, std).cdf) > 1e-3
    assert ks_p(logit(s), scipy_stats.norm(mean + 0.1, std).cdf) < 1e-6  # the test has power


@pytest.mark.parametrize("shift", [3.1582, 1.0, 0.5])
def test_shift_is_logit_normal_moved_by_log_shift(shift):
    s = draw("shift", shift=shift)
    assert ks_p(logit(s), scipy_stats.norm(math.log(shift), 1.0).cdf) > 1e-3
    assert ks_p(logit(s), scipy_stats.norm(math.log(shift) + 0.1, 1.0).cdf) < 1e-6


@pytest.mark.parametrize("tokens, mu", [(256, 0.5), (4096, 1.15), (1024, 0.5 + 0.65 * 768 / 3840)])
def test_flux_shift_matches_analytic_distribution(tokens, mu):
    assert flux_shift_mu(tokens) == pytest.approx(mu)
    s = draw("flux_shift", image_tokens=tokens)
    assert ks_p(logit(s), scipy_stats.norm(mu, 1.0).cdf) > 1e-3
    # quantiles against the analytic ones: q-quantile of s is sigmoid(mu + Phi^-1(q))
    for q in (0.1, 0.5, 0.9):
        expected = 1 / (1 + math.exp(-(mu + scipy_stats.norm.ppf(q))))
        assert np.quantile(s, q) == pytest.approx(expected, abs=0.01)


def test_flux_shift_grows_with_resolution():
    medians = [np.median(draw("flux_shift", image_tokens=tokens_for_latent(h, h)))
               for h in (64, 96, 128)]  # 512², 768², 1024² images
    assert medians[0] < medians[1] < medians[2]


def test_flux_shift_at_1024_equals_default_shift():
    u = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    flux_time_shift = math.exp(1.15) / (math.exp(1.15) + (1 / u - 1))   # BFL's formula
    torch.testing.assert_close(shift_timesteps(u, 3.1582), flux_time_shift, atol=1e-4, rtol=0)
    a = draw("flux_shift", seed=3, image_tokens=4096)
    b = draw("shift", seed=3)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_uniform_is_uniform():
    s = draw("uniform")
    assert ks_p(s, scipy_stats.uniform(0, 1).cdf) > 1e-3
    assert ks_p(s, scipy_stats.beta(1.1, 1).cdf) < 1e-6


@pytest.mark.parametrize("method", sorted(METHODS))
def test_deterministic_given_generator_and_inside_open_interval(method):
    kw = {"image_tokens": 4096} if method == "flux_shift" else {}
    a = sample_timesteps(method, 64, torch.Generator().manual_seed(7), **kw)
    b = sample_timesteps(method, 64, torch.Generator().manual_seed(7), **kw)
    c = sample_timesteps(method, 64, torch.Generator().manual_seed(8), **kw)
    assert a.shape == (64,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a > 0) & (a < 1)).all()


def test_extreme_std_stays_strictly_inside_0_1():
    s = sample_timesteps("shift", 10000, torch.Generator().manual_seed(0), std=30.0)
    assert (s > 0).all() and (s < 1).all()


def test_successive_draws_continue_the_generator():
    g = torch.Generator().manual_seed(1)
    first, second = (sample_timesteps("logit_normal", 4, g) for _ in range(2))
    assert not torch.equal(first, second)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        sample_timesteps("sigma", 2, torch.Generator())
    for name in METHODS:
        assert repr(name) in str(err.value)


def test_flux_shift_without_tokens_says_what_to_pass():
    with pytest.raises(ValueError, match="image_tokens="):
        sample_timesteps("flux_shift", 2, torch.Generator())


def test_missing_generator_is_a_clear_error():
    with pytest.raises(TypeError, match="torch.Generator"):
        sample_timesteps("uniform", 2, 0)


def test_tokens_for_latent():
    assert tokens_for_latent(128, 128) == 4096
    assert tokens_for_latent(64, 96) == 1536
    with pytest.raises(ValueError, match="not even"):
        tokens_for_latent(63, 64)
