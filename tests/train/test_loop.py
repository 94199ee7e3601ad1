"""The generic loop: mesh equivalence, gradient accumulation, stateful objectives, bad input."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc import parallel
from jaxaigc.configs import lm as lm_config
from jaxaigc.data.pipeline import BatchIterator, DataStateMismatch
from jaxaigc.models.clip import CLIP, CLIPConfig
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.autoregressive import lm_loss_fn
from jaxaigc.systems import lm
from jaxaigc.train.loop import NonFiniteLossError, Task, default_train_config, train
from jaxaigc.train.optim import decay_mask, make_optimizer
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import make_train_step
from tests.helpers import max_relative_difference


def tiny_lm_config(steps=20):
    c = lm_config.get_config()
    c.model.update(context_length=16, width=32, layers=2, heads=4)
    c.data.lines = 2000
    c.train.update(steps=steps, batch_size=8, log_every=1, checkpoint_every=10)
    return c


def run(config, workdir, mesh):
    _, task, batches = lm.build(config)
    losses = []
    state = train(
        task,
        batches,
        config,
        workdir,
        mesh=mesh,
        hooks=[lambda step, state, m: losses.append(float(m["train/loss"]))],
    )
    return np.array(losses), jax.device_get(state.params)


@pytest.mark.slow
def test_one_device_and_2x2x2_mesh_train_identically(tmp_path, mesh_1, mesh_2x2x2):
    config = tiny_lm_config()
    losses_1, params_1 = run(config, tmp_path / "one", mesh_1)
    losses_8, params_8 = run(config, tmp_path / "eight", mesh_2x2x2)
    assert len(losses_1) == 20 and losses_1[-1] < losses_1[0] - 0.5  # it learns
    np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
    assert max_relative_difference(params_8, params_1) <= 1e-5


def test_indivisible_batch_fails_before_compiling(tmp_path, mesh_2x2x2):
    config = tiny_lm_config()
    config.train.batch_size = 6
    with pytest.raises(ValueError, match="global batch size 6 is not divisible by the data-par"):
        train(*lm.build(config)[1:], config, tmp_path, mesh=mesh_2x2x2)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


class NaNAt:
    """Batches of a regression task whose targets turn NaN from batch ``bad`` on."""

    def __init__(self, bad):
        self.index, self.bad, self.rows = 0, bad, np.arange(8)

    def select_rows(self, rows):
        self.rows = rows

    def __next__(self):
        self.index += 1
        x = np.random.default_rng(self.index).normal(size=(8, 4)).astype(np.float32)[self.rows]
        y = x.sum(-1, keepdims=True) * (np.nan if self.index >= self.bad else 1.0)
        return {"x": x, "y": y}

    def get_state(self):
        return {"index": self.index}

    def set_state(self, state):
        self.index = state["index"]


def regression_task():
    model = nn.Dense(
        1, kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed", "mlp"))
    )

    def loss_fn(params, batch, rng):
        loss = ((model.apply({"params": params}, batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {}

    return Task(init=lambda rng: model.init(rng, jnp.zeros((1, 4))), loss_fn=loss_fn)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path, mesh_2x2x2):
    config = default_train_config()
    config.train.update(steps=20, batch_size=8, checkpoint_every=4)
    with pytest.raises(NonFiniteLossError, match=r"at step 7 \(loss nan.*Last good checkpoint: 4"):
        train(regression_task(), NaNAt(bad=7), config, tmp_path, mesh=mesh_2x2x2)
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4]


@pytest.mark.parametrize("bad", [7, 8])  # found one step late, or by the check before a save
def test_finite_loss_with_nan_gradient_is_caught_before_it_is_saved(tmp_path, mesh_2x2x2, bad):
    task = regression_task()

    def loss_fn(params, batch, rng):
        loss, metrics = task.loss_fn(params, batch, rng)
        # From batch ``bad`` on, add sqrt(0): value 0, gradient inf * 0 = NaN.
        kernel = params["kernel"]
        poison = jax.lax.cond(
            batch["poison"][0], lambda k: jnp.sqrt(jnp.sum(k * 0.0)), lambda k: 0.0, kernel
        )
        return loss + poison, metrics

    class Poisoned(NaNAt):
        def __next__(self):
            batch = super().__next__()
            batch["y"] = np.nan_to_num(batch["y"])
            return {**batch, "poison": np.full(len(self.rows), self.index >= self.bad)}

    config = default_train_config()
    config.train.update(steps=20, batch_size=8, checkpoint_every=4)
    with pytest.raises(
        NonFiniteLossError, match=rf"at step {bad} \(loss [0-9.e-]+, grad_norm nan.*checkpoint: 4 "
    ):
        train(Task(task.init, loss_fn), Poisoned(bad), config, tmp_path, mesh=mesh_2x2x2)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [4]


class Rows:
    """Records of the regression task, as a random-access source."""

    def __init__(self, n):
        self.x = np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.x[i].sum(keepdims=True)}

    def __repr__(self):
        return f"Rows({len(self)})"


def test_resume_with_another_global_batch_names_it_and_keeps_the_checkpoint(tmp_path, mesh_1):
    config = default_train_config()
    config.train.update(steps=4, batch_size=8, checkpoint_every=2)
    batches = BatchIterator(Rows(64), global_batch_size=8, seed=0)
    train(regression_task(), batches, config, tmp_path, mesh=mesh_1)
    config.train.update(steps=6, batch_size=16)
    batches = BatchIterator(Rows(64), global_batch_size=16, seed=0)
    with pytest.raises(DataStateMismatch, match="global_batch_size: saved 8, now 16"):
        train(regression_task(), batches, config, tmp_path, mesh=mesh_1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_gradient_accumulation_equals_one_big_batch(mesh_2x2x2):
    task = regression_task()
    tx, _ = make_optimizer(peak_lr=0.1, total_steps=10)
    rules = parallel.make_rules()
    batch = parallel.shard_batch(next(NaNAt(bad=99)), mesh_2x2x2)
    results = []
    for accum in (1, 2):
        state, _, _ = create_sharded_state(task.init, tx, jax.random.key(0), mesh_2x2x2, rules)
        step = jax.jit(make_train_step(task.loss_fn, tx, rng=jax.random.key(1), accum_steps=accum))
        for _ in range(3):
            state, metrics = step(state, batch)
        results.append((jax.device_get(state.params), float(metrics["train/loss"])))
    assert max_relative_difference(results[1][0], results[0][0]) < 1e-6
    assert results[1][1] == pytest.approx(results[0][1], rel=1e-6)


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_weights_microbatches_by_their_tokens(accum, mesh_2x2x2):
    """Padded LM rows: the accumulated gradient equals the big batch's, however the padding
    falls over the microbatches (equal weights would over-count the sparse microbatches)."""
    model = GPT(GPTConfig(vocab_size=32, context_length=12, width=16, layers=1, heads=2))
    loss_fn = lm_loss_fn(model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32, (8, 13)).astype(np.int32)
    # Row r keeps its first 1 + 11 * (r % accum == accum - 1) targets: microbatches (rows taken
    # with stride accum) hold very different token counts.
    lengths = np.where(np.arange(8) % accum == accum - 1, 12, 1 + np.arange(8) % 3)
    weights = (np.arange(12)[None, :] < lengths[:, None]).astype(np.float32)
    batch = parallel.shard_batch({"tokens": tokens, "weights": weights}, mesh_2x2x2)
    tx = optax.sgd(1.0)  # the update is the gradient
    rules = parallel.make_rules()
    init = lambda key: model.init(key, jnp.zeros((1, 12), jnp.int32))
    results = []
    for steps in (1, accum):
        state, _, _ = create_sharded_state(init, tx, jax.random.key(0), mesh_2x2x2, rules)
        step = make_train_step(loss_fn, tx, rng=jax.random.key(1), accum_steps=steps)
        with nn.logical_axis_rules(rules), jax.set_mesh(mesh_2x2x2):
            new, metrics = jax.jit(step)(state, batch)
        update = jax.tree.map(np.subtract, jax.device_get(new.params), jax.device_get(state.params))
        results.append((update, jax.device_get(metrics)))
    (big, big_metrics), (accumulated, metrics) = results
    assert max_relative_difference(accumulated, big) < 1e-5
    assert metrics["train/loss"] == pytest.approx(big_metrics["train/loss"], rel=1e-5)
    assert metrics["train/loss_weight"] == weights.sum() == big_metrics["train/loss_weight"]


class BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, *, train):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(1)(x)


def test_stateful_objective_updates_batch_statistics(tmp_path, mesh_2x2x2):
    model = BatchNormNet()

    def loss_fn(params, model_state, batch, rng):
        out, updates = model.apply(
            {"params": params, **model_state}, batch["x"], train=True, mutable=["batch_stats"]
        )
        return ((out - batch["y"]) ** 2).mean(), ({}, updates)

    task = Task(
        init=lambda rng: model.init(rng, jnp.zeros((1, 4)), train=False),
        loss_fn=loss_fn,
        has_model_state=True,
    )
    config = default_train_config()
    config.train.update(steps=8, batch_size=8, checkpoint_every=4)
    state = train(task, NaNAt(bad=99), config, tmp_path, mesh=mesh_2x2x2)
    mean = np.asarray(state.model_state["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.abs(mean).max() > 0.05  # moved from its zero init towards the data mean


def test_ema_averages_batch_statistics_with_the_parameters(tmp_path, mesh_2x2x2):
    """EMA weights are evaluated with the same average of the BatchNorm statistics."""
    model = BatchNormNet()

    def loss_fn(params, model_state, batch, rng):
        out, updates = model.apply(
            {"params": params, **model_state}, batch["x"] + 1.0, train=True, mutable=["batch_stats"]
        )
        return ((out - batch["y"]) ** 2).mean(), ({}, updates)

    init = lambda rng: model.init(rng, jnp.zeros((1, 4)), train=False)
    task = Task(init=init, loss_fn=loss_fn, has_model_state=True)
    config = default_train_config()
    config.train.update(steps=6, batch_size=8, checkpoint_every=100, ema_decay=0.5)
    live = []
    hook = lambda step, state, metrics: live.append(jax.device_get(state.model_state))
    state = train(task, NaNAt(bad=99), config, tmp_path, mesh=mesh_2x2x2, hooks=[hook])
    expected = {"batch_stats": init(jax.random.key(0))["batch_stats"]}
    for stats in live:
        expected = jax.tree.map(lambda e, x: 0.5 * e + 0.5 * x, expected, stats)
    got = state.eval_variables
    assert max_relative_difference(got["batch_stats"], expected["batch_stats"]) < 1e-6
    assert max_relative_difference(got["batch_stats"], live[-1]["batch_stats"]) > 0.05
    assert got["params"] is state.ema_params


def test_weight_decay_skips_biases_and_norm_scales():
    params = {
        "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
        "ln": {"scale": jnp.ones(2)},
        "stacked": {"bias": jnp.ones((3, 2))},  # a scanned bias is 2-D but must not decay
    }
    mask = decay_mask(params)
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "ln": {"scale": False},
        "stacked": {"bias": False},
    }


@pytest.mark.parametrize("preset", ["tiny-vit", "tiny-rn"])
def test_weight_decay_skips_every_vector_parameter_of_a_clip(preset):
    model = CLIP(CLIPConfig.from_name(preset, logit_bias_init=-10.0))
    variables = jax.eval_shape(
        model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 77), jnp.int32)
    )
    params = nn.meta.unbox(variables["params"])
    decays = decay_mask(params)
    assert not decays["logit_bias"] and not decays["logit_scale"]
    if preset == "tiny-vit":
        assert not decays["visual"]["class_embedding"]
    # open_clip's rule: a parameter decays if and only if it has at least 2 dimensions (attention
    # biases are [heads, head_dim] here, [width] in PyTorch).
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for decay, (path, x) in zip(jax.tree.leaves(decays), leaves, strict=True):
        assert decay == (x.ndim >= 2 and path[-1].key != "bias"), jax.tree_util.keystr(path)
