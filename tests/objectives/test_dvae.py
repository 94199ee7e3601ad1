"""The dVAE objective: its terms against NumPy, the schedules, the relaxation, short training."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.integrate

from jaxaigc import parallel
from jaxaigc.models.dvae import (
    DVAEConfig,
    as_dvae_variables,
    decode,
    encode,
    init_train_variables,
    map_pixels,
)
from jaxaigc.objectives import dvae
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step
from tests.helpers import max_relative_difference

# 16 px images -> 4 x 4 tokens; small enough to compile and train in seconds.
TINY = DVAEConfig(n_hid=16, n_blk_per_group=1, group_count=3, vocab_size=32, n_init=16)


def test_kl_to_uniform_is_zero_for_uniform_logits_and_matches_numpy():
    np.testing.assert_allclose(dvae.kl_to_uniform(jnp.full((2, 3, 3, 16), 0.7)), 0.0, atol=1e-5)
    logits = np.random.default_rng(0).normal(size=(2, 3, 3, 16)) * 3
    q = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = (q * np.log(q * 16)).sum((1, 2, 3))
    np.testing.assert_allclose(dvae.kl_to_uniform(jnp.float32(logits)), expected, rtol=1e-5)


def test_logit_laplace_nll_equals_the_density_evaluated_directly():
    rng = np.random.default_rng(0)
    x = np.asarray(map_pixels(rng.uniform(size=(2, 4, 4, 3))), np.float64)
    mu, log_b = rng.normal(size=(2, 2, 4, 4, 3))
    b = np.exp(log_b)
    logit = np.log(x / (1 - x))
    density = np.exp(-np.abs(logit - mu) / b) / (2 * b * x * (1 - x))
    stats = jnp.float32(np.concatenate([mu, log_b], -1))
    nll = dvae.logit_laplace_nll(jnp.float32(x), stats)
    np.testing.assert_allclose(nll, -np.log(density).sum((1, 2, 3)), rtol=1e-5)


def test_gaussian_nll_equals_the_density_evaluated_directly_and_ignores_log_b():
    rng = np.random.default_rng(0)
    x = np.asarray(map_pixels(rng.uniform(size=(2, 4, 4, 3))), np.float64)
    mu, log_b = rng.normal(size=(2, 2, 4, 4, 3))
    mean, scale = 1 / (1 + np.exp(-mu)), 0.1
    density = np.exp(-0.5 * ((x - mean) / scale) ** 2) / (scale * np.sqrt(2 * np.pi))
    objective = dvae.DVAEObjectiveConfig(likelihood="gaussian", gaussian_scale=scale)
    for b in (log_b, 5 * log_b):
        stats = jnp.float32(np.concatenate([mu, b], -1))
        nll = dvae.reconstruction_nll(objective, jnp.float32(x), stats)
        np.testing.assert_allclose(nll, -np.log(density).sum((1, 2, 3)), rtol=1e-5)


def test_unknown_likelihood_is_an_error():
    with pytest.raises(ValueError, match="unknown likelihood 'laplace'"):
        dvae.DVAEObjectiveConfig(likelihood="laplace")


def logit_laplace_density(x: float, mu: float, b: float) -> float:
    """f(x | mu, b) of App. A.3, in float64."""
    return math.exp(-abs(math.log(x / (1 - x)) - mu) / b) / (2 * b * x * (1 - x))


@pytest.mark.parametrize("mu, log_b", [(0.3, -1.0), (-2.0, -3.0), (1.5, 0.5)])
def test_logit_laplace_density_integrates_to_one(mu, log_b):
    b = math.exp(log_b)
    # The density peaks sharply at sigmoid(mu) when b is small: quad is told where.
    integral, _ = scipy.integrate.quad(
        logit_laplace_density, 0, 1, args=(mu, b), points=[1 / (1 + math.exp(-mu))], limit=200
    )
    assert integral == pytest.approx(1.0, abs=1e-6)
    x = np.linspace(0.01, 0.99, 99)
    log_f = dvae.logit_laplace_log_prob(jnp.float32(x), jnp.float32(mu), jnp.float32(log_b))
    expected = np.log([logit_laplace_density(v, mu, b) for v in x])
    np.testing.assert_allclose(log_f, expected, rtol=1e-5, atol=1e-5)


def test_the_log_scale_floor_is_honoured_and_passes_gradients():
    log_b = jnp.linspace(-20.0, 5.0, 101)
    floored = dvae.floor_log_scale(log_b, -2.0)
    assert float(floored.min()) >= -2.0
    np.testing.assert_allclose(floored[-1], 5.0, atol=1e-3)  # far above the floor: unchanged
    assert bool(jnp.all(jnp.diff(floored) >= 0))  # monotone
    grad = jax.grad(lambda v: dvae.floor_log_scale(v, -2.0).sum())(log_b)
    assert bool(jnp.all(grad > 0)) and float(grad[-1]) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(dvae.floor_log_scale(log_b, None), log_b)
    # The NLL of a pixel decoded exactly is bounded below by the floor's density.
    x = jnp.full((1, 1, 1, 3), 0.1)
    mu = jnp.log(x / (1 - x))
    stats = jnp.concatenate([mu, jnp.full_like(mu, -30.0)], -1)
    bound = 3 * (-2.0 + math.log(2.0) + math.log(0.1) + math.log(0.9))
    assert float(dvae.logit_laplace_nll(x, stats, -2.0)[0]) == pytest.approx(bound, abs=1e-4)
    assert float(dvae.logit_laplace_nll(x, stats)[0]) < -50  # unbounded without it


def test_the_gaussian_warmup_hands_the_nll_to_the_logit_laplace():
    rng = np.random.default_rng(0)
    x = jnp.float32(map_pixels(rng.uniform(size=(2, 4, 4, 3))))
    stats = jnp.float32(rng.normal(size=(2, 4, 4, 6)))
    warmup = dvae.DVAEObjectiveConfig(gaussian_warmup_steps=100, log_scale_floor=-2.0)
    gaussian = dvae.gaussian_nll(x, stats, warmup.gaussian_scale)
    laplace = dvae.reconstruction_nll(warmup, x, stats)
    weight = dvae.gaussian_weight_schedule(warmup)
    assert [float(weight(s)) for s in (0, 50, 100, 1_000)] == pytest.approx([1, 0.5, 0, 0])

    def trained(step):
        return dvae.warmup_nll(warmup, x, stats, laplace, weight(step))

    np.testing.assert_allclose(trained(0), gaussian, rtol=1e-6)
    np.testing.assert_allclose(trained(50), (gaussian + laplace) / 2, rtol=1e-6)
    np.testing.assert_allclose(trained(100), laplace, rtol=1e-6)
    assert float(jnp.abs(gaussian - laplace).min()) > 1.0
    # The Gaussian likelihood and a zero-length warm-up train on the NLL given.
    no_warmup = (warmup.replace(likelihood="gaussian"), warmup.replace(gaussian_warmup_steps=0))
    for objective in no_warmup:
        np.testing.assert_array_equal(dvae.warmup_nll(objective, x, stats, laplace, 0.5), laplace)


def test_schedules_hit_their_endpoints():
    config = dvae.DVAEObjectiveConfig()
    beta, temperature = dvae.beta_schedule(config), dvae.temperature_schedule(config)
    assert float(beta(0)) == 0.0
    assert float(beta(2_500)) == pytest.approx(3.3)
    assert float(beta(5_000)) == pytest.approx(6.6)
    assert float(beta(50_000)) == pytest.approx(6.6)
    assert float(temperature(0)) == 1.0
    assert float(temperature(150_000)) == pytest.approx(1 / 16)
    assert float(temperature(10**6)) == pytest.approx(1 / 16)
    assert float(dvae.cosine_schedule(1.0, 2.0, 0)(0)) == 2.0


def test_gumbel_softmax_sums_to_one_and_hardens_at_low_temperature():
    logits = jax.random.normal(jax.random.key(0), (64, 10))
    soft = dvae.gumbel_softmax(jax.random.key(1), logits, 1.0)
    np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-5)
    cold = dvae.gumbel_softmax(jax.random.key(1), logits, 1e-3)
    assert float(cold.max(-1).min()) > 0.99
    # Gumbel-max: the sample's argmax is distributed as softmax(logits).
    logits = jnp.log(jnp.array([0.1, 0.2, 0.7]))
    samples = dvae.gumbel_softmax(jax.random.key(2), jnp.tile(logits, (20_000, 1)), 1.0)
    frequencies = np.bincount(np.asarray(samples.argmax(-1)), minlength=3) / 20_000
    np.testing.assert_allclose(frequencies, [0.1, 0.2, 0.7], atol=0.015)


def test_straight_through_is_one_hot_forward_with_the_soft_gradient():
    logits = jax.random.normal(jax.random.key(0), (4, 8))
    weights = jax.random.normal(jax.random.key(1), (4, 8))

    def objective(logits, straight_through):
        sample = dvae.gumbel_softmax(
            jax.random.key(2), logits, 0.5, straight_through=straight_through
        )
        return jnp.sum(weights * sample), sample

    (_, hard), hard_grad = jax.value_and_grad(objective, has_aux=True)(logits, True)
    (_, soft), soft_grad = jax.value_and_grad(objective, has_aux=True)(logits, False)
    np.testing.assert_array_equal(hard, jax.nn.one_hot(soft.argmax(-1), 8))
    np.testing.assert_allclose(hard_grad, soft_grad, rtol=1e-6)


def test_codebook_usage():
    perplexity, used = dvae.codebook_usage(jnp.arange(16) % 8, 32)
    assert float(perplexity) == pytest.approx(8.0) and float(used) == 0.25
    perplexity, used = dvae.codebook_usage(jnp.zeros((4, 4), jnp.int32), 32)
    assert float(perplexity) == pytest.approx(1.0) and float(used) == 1 / 32


def test_psnr():
    x = jnp.zeros((2, 4, 4, 3))
    np.testing.assert_allclose(dvae.psnr(x + 0.1, x), 20.0, rtol=1e-5)


def images(n: int = 8, size: int = 16) -> np.ndarray:
    """Squares of random colour and place on a black background, uint8 [n, size, size, 3]."""
    rng = np.random.default_rng(0)
    out = np.zeros((n, size, size, 3), np.uint8)
    for image in out:
        y, x = rng.integers(0, size // 2, 2)
        image[y : y + size // 2, x : x + size // 2] = rng.integers(64, 256, 3)
    return out


def train_state(mesh, objective, tx=None, rules=None):
    tx = tx or optax.adam(3e-3)
    rules = rules or parallel.make_rules()
    state, shardings, _ = create_sharded_state(
        lambda rng: init_train_variables(TINY, rng), tx, jax.random.key(0), mesh, rules
    )
    step = make_train_step(
        dvae.make_loss_fn(TINY, objective), tx, rng=jax.random.key(1), pass_step=True
    )
    batch = parallel.shard_batch({"images": images()}, mesh)
    return state, jit_train_step(step, mesh, rules, shardings, batch), batch


OBJECTIVE = dvae.DVAEObjectiveConfig(beta_steps=10, temperature_steps=40)


@pytest.fixture(scope="module")
def one_device_run(mesh_1):
    """Parameters after the first step, the metrics of 40 steps and the final state on one
    device."""
    state, step, batch = train_state(mesh_1, OBJECTIVE)
    history = []
    for i in range(40):
        state, metrics = step(state, batch)
        history.append(jax.device_get(metrics))
        if i == 0:
            first_params = jax.device_get(state.params)
    return first_params, history, state


@pytest.mark.slow
def test_loss_falls_and_the_schedules_follow_the_step(one_device_run):
    _, history, _ = one_device_run
    first, last = history[0], history[-1]
    assert first["train/beta"] == 0.0 and last["train/beta"] == pytest.approx(6.6)
    assert first["train/temperature"] == 1.0
    assert last["train/temperature"] < 0.1
    assert last["train/nll_bpd"] < first["train/nll_bpd"] - 1.0
    assert last["train/psnr"] > first["train/psnr"]
    assert 0.0 < last["train/codes_used"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("conv_in", [None, "fsdp"])
def test_one_step_on_a_2x2x2_mesh_equals_one_device(mesh_1, mesh_2x2x2, conv_in):
    # SGD, not Adam: Adam's first step is lr * sign(g), which turns the ~1e-9 reduction-order
    # noise of near-zero gradient entries into lr-sized differences. With kernels' input channels
    # on fsdp, Shardy's gradients were up to 67% off (parallel.partitioner chooses GSPMD there).
    rules = parallel.make_rules({"conv_in": conv_in})
    params, losses = [], []
    for mesh in (mesh_1, mesh_2x2x2):
        state, step, batch = train_state(mesh, OBJECTIVE, optax.sgd(0.1), rules)
        state, metrics = step(state, batch)
        params.append(jax.device_get(state.params))
        losses.append(float(metrics["train/loss"]))
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert max_relative_difference(params[1], params[0]) < 1e-5


@pytest.mark.slow
def test_trained_params_encode_and_decode(one_device_run):
    *_, state = one_device_run
    variables = as_dvae_variables(jax.device_get(state.params))
    ids = encode(TINY, variables, images())
    assert ids.shape == (8, 4, 4)
    assert decode(TINY, variables, ids).shape == (8, 16, 16, 3)


def test_the_loss_needs_the_step():
    loss_fn = dvae.make_loss_fn(TINY)
    with pytest.raises(TypeError, match="step"):
        loss_fn({}, {"images": images()}, jax.random.key(0))
