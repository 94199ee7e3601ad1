"""The DALL-E transformer: sizes, logical axes, KV-cache decoding, attention paths, the loss,
input checks and a sharded train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc import parallel
from jaxaigc.models.dalle import DALLE, PRESETS, DALLEConfig
from jaxaigc.objectives.dalle import dalle_loss_fn
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step
from tests.helpers import (
    assert_logical_axes,
    assert_one_step_matches_one_device,
    max_relative_difference,
    per_device_fraction,
)

# Every mask kind once: the KV-cache and path tests cover them all.
ALL_KINDS = ("dense", "row", "column", "conv")
TINY = DALLEConfig.from_name("tiny", layer_kinds=ALL_KINDS)
KEY = jax.random.key(0)


def inputs(config, batch=2, caption=10, seed=0):
    """Captions of ``caption`` tokens padded with 0, and random image tokens."""
    rng = np.random.default_rng(seed)
    text = rng.integers(1, config.text_vocab, (batch, config.text_len)).astype(np.int32)
    text[:, caption:] = config.pad_id
    image = rng.integers(0, config.image_vocab, (batch, config.image_len)).astype(np.int32)
    return text, image


@pytest.fixture(scope="module")
def tiny_params():
    text, image = inputs(TINY)
    return nn.meta.unbox(jax.jit(DALLE(TINY).init)(jax.random.key(0), text, image)["params"])


def count(tree) -> int:
    return sum(np.prod(x.shape) for x in jax.tree.leaves(tree))


def expected_count(c: DALLEConfig) -> int:
    d, hidden = c.width, int(c.width * c.mlp_ratio)
    block = 4 * d * d + 3 * d + 2 * d * hidden + hidden + d + 4 * d  # attn, mlp, two LayerNorms
    embeddings = (c.text_vocab + 2 * c.text_len + c.image_vocab + 2 * c.image_side) * d
    return c.layers * block + embeddings + 2 * d + d * (c.text_vocab + c.image_vocab) + c.text_vocab


def abstract_init(config):
    text = jax.ShapeDtypeStruct((1, config.text_len), jnp.int32)
    image = jax.ShapeDtypeStruct((1, config.image_len), jnp.int32)
    return jax.eval_shape(DALLE(config).init, jax.random.key(0), text, image)["params"]


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_counts(name):
    config = DALLEConfig.from_name(name)
    params = abstract_init(config)
    assert count(params) == expected_count(config)
    if name == "paper-12b":
        assert config.width == 62 * 64 and config.length == 256 + 1024
        assert 12.0e9 < count(params) < 12.3e9  # the paper's "12-billion parameter" transformer


def test_output_shapes(tiny_params):
    text, image = inputs(TINY)
    apply = jax.jit(DALLE(TINY).apply)
    text_logits, image_logits = apply({"params": tiny_params}, text, image)
    assert text_logits.shape == (2, 16, 1024) and image_logits.shape == (2, 64, 512)
    _, prefix_logits = apply({"params": tiny_params}, text, image[:, :5])
    assert prefix_logits.shape == (2, 6, 512)  # image tokens 0..5 from a 5-token prefix
    np.testing.assert_allclose(prefix_logits, image_logits[:, :6], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name, changes", [("tiny", {}), ("tiny", {"scan_layers": True}), ("paper-12b", {})]
)
def test_every_parameter_has_logical_axis_names(name, changes):
    params = abstract_init(DALLEConfig.from_name(name, **changes))
    assert_logical_axes(params)


def test_paper_12b_shards_over_fsdp_and_tensor(mesh_2x2x2):
    """Each device of a 2x2x2 mesh holds a quarter of the parameters (fsdp x tensor = 4)."""
    rules = parallel.make_rules()
    with nn.logical_axis_rules(rules):
        abstract = abstract_init(DALLEConfig.from_name("paper-12b"))
    assert per_device_fraction(abstract, mesh_2x2x2, rules) < 0.251


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decoding_equals_the_full_forward_for_every_mask_kind(tiny_params, scan_layers):
    config = TINY.replace(scan_layers=scan_layers)
    params = tiny_params
    if scan_layers:
        blocks = [params["transformer"][f"resblocks_{i}"] for i in range(config.layers)]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
        params = {**params, "transformer": {"resblocks": stacked}}
    text, image = inputs(config)
    text_full, image_full = jax.jit(DALLE(config).apply)({"params": params}, text, image)

    decoder = DALLE(config.replace(decode=True))
    cache = jax.jit(decoder.init)(jax.random.key(0), text, image)["cache"]
    prefill = jax.jit(
        lambda cache, text, image: decoder.apply(
            {"params": params, "cache": cache}, text, image, mutable="cache"
        )
    )
    step = jax.jit(
        lambda cache, image: decoder.apply(
            {"params": params, "cache": cache}, None, image, mutable="cache"
        )
    )
    (text_logits, logits), cache = prefill(cache, text, image[:, :3])  # text + 3 image tokens
    outputs = [logits]
    for j in range(3, config.image_len - 1):  # then one image token at a time
        (_, logits), cache = step(cache["cache"], image[:, j : j + 1])
        outputs.append(logits)
    np.testing.assert_allclose(text_logits, text_full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(outputs, 1), image_full, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sparse_path_equals_the_dense_path_with_gradients(tiny_params):
    text, image = inputs(TINY)
    batch = {"text": text, "image": image}
    results = []
    for attention in ("sparse", "dense"):
        # block_size 16: two grid rows per block, so the row and conv windows cross blocks.
        loss_fn = dalle_loss_fn(DALLE(TINY.replace(attention=attention, block_size=16)))
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss, _), grads = grad_fn(tiny_params, batch, jax.random.key(0))
        results.append((loss, grads))
    assert max_relative_difference(results[0], results[1]) < 1e-5


@pytest.mark.parametrize("kernel", ["splash", "triton"])
def test_pallas_kernels_equal_the_dense_path(tiny_params, kernel):
    """The Pallas TPU and GPU kernels in interpret mode (CPU), 80 tokens padded to one 128-block
    (splash) or two 64-blocks (Triton)."""
    text, image = inputs(TINY)
    outputs = [
        jax.jit(DALLE(TINY.replace(attention=attention)).apply)(
            {"params": tiny_params}, text, image
        )
        for attention in (kernel, "dense")
    ]
    assert max_relative_difference(outputs[0], outputs[1]) < 1e-5


def test_padded_positions_use_the_per_position_pad_embedding(tiny_params):
    text, image = inputs(TINY, caption=10)
    loss_fn = dalle_loss_fn(DALLE(TINY))
    batch = {"text": text, "image": image}
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, KEY)[0]))(tiny_params)
    assert not np.any(grads["text_embedding"][TINY.pad_id])  # the pad id's own row is never used
    used = np.abs(grads["pad_embedding"]).sum(-1) > 0
    np.testing.assert_array_equal(used, np.arange(TINY.text_len) >= 10)
    # A short caption is padded to text_len.
    apply = jax.jit(DALLE(TINY).apply)
    short = apply({"params": tiny_params}, text[:, :10], image)
    full = apply({"params": tiny_params}, text, image)
    assert max_relative_difference(short, full) == 0.0


def test_loss_weights_text_and_image_cross_entropy(tiny_params):
    text, image = inputs(TINY)
    model = DALLE(TINY)
    text_logits, image_logits = jax.jit(model.apply)({"params": tiny_params}, text, image)

    def cross_entropy(logits, targets):
        logits = np.asarray(logits, np.float64)
        log_z = np.log(np.exp(logits).sum(-1))
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        return (log_z - picked).mean()

    text_ce, image_ce = cross_entropy(text_logits, text), cross_entropy(image_logits, image)
    batch = {"text": text, "image": image}
    paper, (loss, metrics) = jax.jit(
        lambda p: (
            dalle_loss_fn(model)(p, batch, KEY)[0],
            dalle_loss_fn(model, text_weight=0.5, image_weight=2.0)(p, batch, KEY),
        )
    )(tiny_params)
    np.testing.assert_allclose(paper, text_ce / 8 + 7 * image_ce / 8, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * text_ce + 2.0 * image_ce, rtol=1e-5)
    np.testing.assert_allclose(metrics["image_nll"], image_ce, rtol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters(tiny_params):
    text, image = inputs(TINY)
    config = TINY.replace(dtype="bfloat16")
    abstract = abstract_init(config)
    assert {x.dtype for x in jax.tree.leaves(nn.meta.unbox(abstract))} == {jnp.dtype("float32")}
    low = jax.jit(DALLE(config).apply)({"params": tiny_params}, text, image)
    high = jax.jit(DALLE(TINY).apply)({"params": tiny_params}, text, image)
    assert low[1].dtype == jnp.float32
    assert max_relative_difference(low, high) < 0.05


def test_config_errors_name_the_value_and_the_limit():
    with pytest.raises(ValueError, match=r"unknown DALL-E model 'huge'; known: \['paper-12b'"):
        DALLEConfig.from_name("huge")
    with pytest.raises(ValueError, match="width 130 is not divisible by 4 heads"):
        DALLEConfig.from_name("tiny", width=130)
    with pytest.raises(ValueError, match=r"pad_id 1024 is outside the text vocabulary \[0, 1024\)"):
        DALLEConfig.from_name("tiny", pad_id=1024)
    with pytest.raises(ValueError, match="3 layer_kinds given for 4 layers"):
        DALLEConfig.from_name("tiny", layer_kinds=("row", "row", "conv"))
    with pytest.raises(ValueError, match=r"unknown mask kinds \['diagonal'\]"):
        DALLEConfig.from_name("tiny", layer_kinds=("row", "row", "row", "diagonal"))
    with pytest.raises(ValueError, match="unknown attention 'flash'"):
        DALLEConfig.from_name("tiny", attention="flash")
    with pytest.raises(ValueError, match="conv_kernel 4 must be a positive odd number"):
        DALLEConfig.from_name("tiny", conv_kernel=4)


def test_bad_inputs_name_the_value_and_the_limit(tiny_params):
    text, image = inputs(TINY)
    model = DALLE(TINY)
    apply = lambda text, image: model.apply({"params": tiny_params}, text, image)  # noqa: E731
    too_long = np.concatenate([text, text[:, :1]], 1)
    with pytest.raises(ValueError, match=r"caption of shape \(2, 17\) exceeds text_len 16"):
        apply(too_long, image)
    with pytest.raises(
        ValueError, match=r"image token 512 is outside the image vocabulary \[0, 512\)"
    ):
        apply(text, _set(image, 512))
    with pytest.raises(ValueError, match=r"image token -1 is outside the image vocabulary"):
        apply(text, _set(image, -1))
    with pytest.raises(
        ValueError, match=r"text token 5000 is outside the text vocabulary \[0, 1024\)"
    ):
        apply(_set(text, 5000), image)
    with pytest.raises(
        ValueError, match=r"image tokens must be \[batch, <= image_side\*\*2 = 64\]"
    ):
        apply(text, np.concatenate([image, image[:, :1]], 1))
    with pytest.raises(ValueError, match="text is required outside decode mode"):
        apply(None, image)


def _set(ids, value):
    ids = np.array(ids)
    ids[0, 3] = value
    return ids


def train_state(mesh, rules):
    model = DALLE(TINY)
    text, image = inputs(TINY, batch=8)
    tx = optax.sgd(0.1)  # a parameter change proportional to the gradient (see test_dvae)
    state, shardings, _ = create_sharded_state(
        lambda rng: model.init(rng, text[:1], image[:1]), tx, jax.random.key(0), mesh, rules
    )
    step = make_train_step(dalle_loss_fn(model), tx, rng=jax.random.key(1))
    batch = parallel.shard_batch({"text": text, "image": image}, mesh)
    return state, jit_train_step(step, mesh, rules, shardings, batch), batch


@pytest.mark.slow
def test_one_step_on_a_2x2x2_mesh_equals_one_device(mesh_1, mesh_2x2x2):
    assert_one_step_matches_one_device(train_state, mesh_1, mesh_2x2x2)
