"""PPO-ptx's equations against plain NumPy loops."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.objectives.ppo import (
    adaptive_kl_beta,
    explained_variance,
    fit_reward_normalizer,
    gae,
    kl_penalty_rewards,
    policy_loss,
    token_entropy,
    value_loss,
    whiten,
)


def _right_padded_mask(lengths, t):
    return np.arange(t)[None, :] < np.asarray(lengths)[:, None]


def _gae_loop(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    advantages = np.zeros((b, t))
    for row in range(b):
        last = 0.0
        for i in reversed(range(t)):
            if not mask[row, i]:
                last = 0.0
                continue
            next_value = values[row, i + 1] if i + 1 < t and mask[row, i + 1] else 0.0
            delta = rewards[row, i] + gamma * next_value - values[row, i]
            last = delta + gamma * lam * last
            advantages[row, i] = last
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5)])
def test_gae_matches_a_plain_loop(gamma, lam):
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(4, 7)), rng.normal(size=(4, 7))
    mask = _right_padded_mask([7, 3, 1, 5], 7)
    got = gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    want = _gae_loop(rewards, values, mask, gamma, lam)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert (np.asarray(got[0])[~mask] == 0).all()


def test_whitening_uses_valid_tokens_only():
    rng = np.random.default_rng(1)
    x, mask = rng.normal(3.0, 2.0, (3, 6)), _right_padded_mask([6, 2, 4], 6)
    padded = np.where(mask, x, 1e6)  # huge values at pads must not enter the statistics
    out = np.asarray(whiten(jnp.asarray(padded), jnp.asarray(mask)))
    valid = x[mask]
    np.testing.assert_allclose(out[mask], (valid - valid.mean()) / valid.std(), rtol=1e-4)
    assert (out[~mask] == 0).all()


def test_kl_penalty_and_the_score_land_on_each_eos():
    logprobs = jnp.array([[-1.0, -2.0, -0.5, -1.0], [-0.2, -0.3, -9.0, -9.0]])
    ref = jnp.array([[-1.5, -2.0, -1.0, -3.0], [-0.1, -0.3, -9.0, -9.0]])
    mask = jnp.array([[True, True, True, False], [True, True, False, False]])
    rewards, kl = kl_penalty_rewards(logprobs, ref, jnp.array([10.0, 20.0]), mask, 0.1)
    np.testing.assert_allclose(kl, [[0.5, 0.0, 0.5, 0.0], [-0.1, 0.0, 0.0, 0.0]], atol=1e-7)
    want = [[-0.05, 0.0, 10.0 - 0.05, 0.0], [0.01, 20.0, 0.0, 0.0]]
    np.testing.assert_allclose(rewards, want, rtol=1e-6, atol=1e-7)


def test_clipped_losses_match_numpy():
    rng = np.random.default_rng(2)
    new, old, adv = rng.normal(size=(3, 3, 5)) * [[1.0], [1.0], [2.0]]
    mask = _right_padded_mask([5, 3, 1], 5)
    ratio = np.exp(new - old)
    want = np.maximum(-adv * ratio, -adv * np.clip(ratio, 0.8, 1.2))[mask].mean()
    loss, metrics = policy_loss(*map(jnp.asarray, (new, old, adv, mask)), clip=0.2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["ratio"], ratio[mask].mean(), rtol=1e-5)
    # Equal log-probs: the ratio is exactly 1 and nothing is clipped.
    _, same = policy_loss(*map(jnp.asarray, (old, old, adv, mask)))
    assert float(same["ratio"]) == 1.0 and float(same["clip_fraction"]) == 0.0

    v, v_old, ret = rng.normal(size=(3, 3, 5))
    clipped = v_old + np.clip(v - v_old, -0.2, 0.2)
    want = 0.5 * np.maximum((v - ret) ** 2, (clipped - ret) ** 2)[mask].mean()
    got = value_loss(*map(jnp.asarray, (v, v_old, ret, mask)), clip=0.2)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_adaptive_kl_controller():
    # Ziegler et al.: the error is clipped to +-0.2 and scaled by n_steps / horizon.
    beta = adaptive_kl_beta(jnp.float32(0.1), jnp.float32(12.0), target=6, horizon=100, n_steps=10)
    np.testing.assert_allclose(beta, 0.1 * (1 + 0.2 * 0.1), rtol=1e-6)
    beta = adaptive_kl_beta(jnp.float32(0.1), jnp.float32(5.7), target=6, horizon=100, n_steps=10)
    np.testing.assert_allclose(beta, 0.1 * (1 - 0.05 * 0.1), rtol=1e-6)


def test_entropy_at_the_rollout_temperature_matches_numpy():
    logits = np.random.default_rng(3).normal(0, 3, (2, 5, 11))
    for temperature in (1.0, 0.5):
        p = np.exp(logits / temperature)
        p /= p.sum(-1, keepdims=True)
        want = -(p * np.log(p)).sum(-1)
        got = token_entropy(jnp.asarray(logits, jnp.float32), temperature)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_explained_variance_over_valid_tokens():
    rng = np.random.default_rng(4)
    returns, noise = rng.normal(2.0, 3.0, (2, 3, 6))
    mask = _right_padded_mask([6, 2, 4], 6)
    values = returns + 0.5 * noise
    want = 1 - np.var((returns - values)[mask]) / np.var(returns[mask])
    padded = [np.where(mask, x, 1e6) for x in (values, returns)]  # pads must not count
    got = explained_variance(*map(jnp.asarray, padded), jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    exact = explained_variance(jnp.asarray(returns), jnp.asarray(returns), jnp.asarray(mask))
    assert float(exact) == 1.0
    mean = np.full_like(returns, returns[mask].mean())
    np.testing.assert_allclose(
        explained_variance(jnp.asarray(mean), jnp.asarray(returns), jnp.asarray(mask)),
        0.0,
        atol=1e-6,
    )


def test_the_reward_normalizer_gives_mean_0_and_std_1_on_its_scores():
    scores = np.random.default_rng(5).gamma(2.0, 3.0, 200) - 4.0
    gain, bias = fit_reward_normalizer(scores)
    normalised = gain * scores + bias
    np.testing.assert_allclose([normalised.mean(), normalised.std()], [0.0, 1.0], atol=1e-12)
    with pytest.raises(ValueError, match="the 3 scores are all 0.5: no scale"):
        fit_reward_normalizer([0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="at least 2 finite scores"):
        fit_reward_normalizer([1.0, np.nan])
