"""The jitted train step: its XLA:CPU options change speed, not results, and what it lowers on
abstract shapes is what it runs."""

import contextlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc import parallel
from jaxaigc.compile_options import training_options
from jaxaigc.models.clip import CLIP, CLIPConfig, clamp_logit_scale
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.autoregressive import lm_loss_fn
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step
from tests.helpers import max_relative_difference


def test_cpu_training_options_match_xla_defaults(mesh_2x2x2):
    """A CLIP ResNet step (convolutions, BatchNorm statistics, text transformer) compiled with
    ``training_options`` updates parameters and statistics as XLA's defaults do, sharded."""
    mesh = mesh_2x2x2
    config = CLIPConfig.from_name("tiny-rn")
    model = CLIP(config)
    rng = np.random.default_rng(0)
    r = config.image_resolution
    images = rng.normal(size=(8, r, r, 3)).astype(np.float32)
    tokens = rng.integers(1, config.vocab_size, (8, config.context_length)).astype(np.int32)
    rules = parallel.make_rules()
    tx = optax.sgd(0.1)  # a parameter change proportional to the gradient
    step = make_train_step(
        clip_loss_fn(model),
        tx,
        rng=jax.random.key(1),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )
    batch = parallel.shard_batch({"image": images, "tokens": tokens}, mesh)

    def init(key):
        return model.init(key, images[:1], tokens[:1])

    assert training_options(mesh)  # these tests run on CPU devices
    results = []
    for options in (None, {}):
        state, shardings, _ = create_sharded_state(init, tx, jax.random.key(0), mesh, rules)
        start = jax.device_get(state.params)
        run = jit_train_step(step, mesh, rules, shardings, batch, compiler_options=options)
        for _ in range(2):
            state, metrics = run(state, batch)
        update = jax.tree.map(np.subtract, jax.device_get(state.params), start)
        results.append((update, jax.device_get(state.model_state), float(metrics["train/loss"])))
    (tuned, tuned_stats, tuned_loss), (default, default_stats, default_loss) = results
    assert tuned_loss == pytest.approx(default_loss, rel=1e-5)
    # Float32 rounding only: BatchNorm gradients through the stem are ill-conditioned (the default
    # build's own RN50 gradients differ from float64 by up to 3e-3), a miscompilation by O(1).
    assert max_relative_difference(tuned, default) < 1e-3
    assert max_relative_difference(tuned_stats, default_stats) < 1e-5


def test_cpu_training_options_reach_the_compiler():
    """The options are accepted and change how XLA:CPU fuses a CLIP step (YNNPACK fusions)."""
    config = CLIPConfig.from_name("tiny-rn")
    model = CLIP(config)
    images = np.zeros((2, config.image_resolution, config.image_resolution, 3), np.float32)
    tokens = np.zeros((2, config.context_length), np.int32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images, tokens)
    loss_fn = clip_loss_fn(model)

    def grads(variables):
        state = {"batch_stats": variables["batch_stats"]}
        batch = {"image": images, "tokens": tokens}
        return jax.grad(lambda p: loss_fn(p, state, batch, jax.random.key(1))[0])(
            variables["params"]
        )

    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    tuned = jax.jit(grads, compiler_options=training_options(mesh))
    default = jax.jit(grads)
    tuned_hlo = tuned.lower(variables).compile().as_text()
    default_hlo = default.lower(variables).compile().as_text()
    assert tuned_hlo.count("ynn_fusion") != default_hlo.count("ynn_fusion")


@contextlib.contextmanager
def compile_log():
    """JAX's compile log while the block runs: lowering logs "Compiling jit(...)", compiling
    "Finished XLA compilation of jit(...)"."""
    messages = []

    class Record(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Record()
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield messages
    finally:
        logging.getLogger("jax").removeHandler(handler)


def test_lowered_on_abstract_shapes_is_the_program_run(mesh_2x2x2):
    """``jit_train_step`` lowers and compiles on ``jax.ShapeDtypeStruct``s, as sizing does, under
    its partitioner, with the state sharded and donated; calling it on arrays then runs that
    compilation: no second trace or compile."""
    model = GPT(GPTConfig(vocab_size=32, context_length=8, width=32, layers=1, heads=2))
    # Convolution input channels on fsdp: parallel.partitioner picks GSPMD, a non-default.
    rules = parallel.make_rules({"conv_in": "fsdp"})
    tx = optax.adam(1e-3)
    step = make_train_step(lm_loss_fn(model), tx, rng=jax.random.key(1))
    state, shardings, abstract_state = create_sharded_state(
        lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32)),
        tx,
        jax.random.key(0),
        mesh_2x2x2,
        rules,
    )
    tokens = np.random.default_rng(0).integers(0, 32, (8, 9)).astype(np.int32)
    batch = parallel.shard_batch({"tokens": tokens}, mesh_2x2x2)
    abstract_batch = {
        "tokens": jax.ShapeDtypeStruct(
            tokens.shape, tokens.dtype, sharding=batch["tokens"].sharding
        )
    }
    run = jit_train_step(step, mesh_2x2x2, rules, shardings, abstract_batch)

    with compile_log() as log:
        lowered = run.lower(abstract_state, abstract_batch)
        compiled = lowered.compile()
    assert any("Finished XLA compilation of jit(train_step)" in m for m in log), log
    text = lowered.as_text()
    assert "tf.aliasing_output" in text  # the old state's buffers are donated
    assert "mhlo.sharding" in text and "sdy.sharding" not in text  # GSPMD, as partitioner chose
    assert jax.tree.map(lambda x: x.shape, run.eval_shape(abstract_state, abstract_batch)[1]) == (
        jax.tree.map(lambda x: x.shape, compiled.out_info[1])
    )

    with compile_log() as log:
        new_state, metrics = run(state, batch)
        jax.block_until_ready(metrics)
    assert not [m for m in log if "jit(train_step)" in m], log
    assert int(new_state.step) == 1 and np.isfinite(float(metrics["train/loss"]))
    head = shardings.params["head"]["kernel"]
    assert head.spec == jax.sharding.PartitionSpec(
        "fsdp", "tensor"
    )  # a sharded state was sized and is trained
    assert new_state.params["head"]["kernel"].sharding == head
    assert compiled.memory_analysis().alias_size_in_bytes > 0
