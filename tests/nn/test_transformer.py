import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.compile_options import CPU_TRAINING_OPTIONS
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.nn import MultiHeadAttention, Transformer, causal_mask
from jaxaigc.nn.attention import single_query_attention
from tests.helpers import max_relative_difference


def reference_attention(params, x, mask):
    """Multi-head attention written out in NumPy (float64)."""
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", x, p["key"]["kernel"])
    v = np.einsum("btd,dhk->bthk", x, p["value"]["kernel"]) + p["value"]["bias"]
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def test_attention_matches_reference_with_causal_and_padding_masks():
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    attention = MultiHeadAttention(num_heads=4, mask_fn=causal_mask)
    params = nn.meta.unbox(attention.init(jax.random.key(1), x)["params"])
    padding = np.ones((2, 1, 1, 6), bool)
    padding[1, ..., 4:] = False  # the last two keys of example 1 are padding
    out = attention.apply({"params": params}, x, mask=jnp.asarray(padding))
    causal = np.tril(np.ones((6, 6), bool))[None, None]
    expected = reference_attention(params, x, causal & padding)
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)


def test_single_query_attention_matches_the_general_form_with_gradients():
    q, k, v = (jax.random.normal(jax.random.key(i), (3, n, 4, 8)) for i, n in enumerate([1, 7, 7]))
    mask = jax.random.bernoulli(jax.random.key(3), 0.7, (3, 1, 1, 7)).at[..., 0].set(True)

    def loss(attention, q, k, v):
        return jnp.sum(jnp.sin(attention(q, k, v, mask=mask)))

    general = jax.value_and_grad(
        lambda *qkv: loss(jax.nn.dot_product_attention, *qkv), argnums=(0, 1, 2)
    )(q, k, v)
    single = jax.value_and_grad(lambda *qkv: loss(single_query_attention, *qkv), argnums=(0, 1, 2))(
        q, k, v
    )
    assert max_relative_difference(single, general) < 1e-5


def test_bfloat16_single_query_gradient_runs_with_the_cpu_training_options():
    # jax.nn.dot_product_attention's gradient here aborted the process (an XLA:CPU check failure
    # in the YNNPACK dot-fusion emitter), as in CLIP's attention pool trained in bfloat16.
    attention = MultiHeadAttention(num_heads=2, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(0), (2, 5, 16), jnp.bfloat16)
    params = attention.init(jax.random.key(1), x[:, :1], x)["params"]
    grad = jax.jit(
        jax.grad(lambda p: attention.apply({"params": p}, x[:, :1], x).astype(float).sum()),
        compiler_options=CPU_TRAINING_OPTIONS if jax.default_backend() == "cpu" else {},
    )(params)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grad))


def _stack(unscanned, layers):
    """Parameters of resblocks_0..n-1 stacked along a leading layers axis (scan layout)."""
    blocks = [unscanned[f"resblocks_{i}"] for i in range(layers)]
    return {"resblocks": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


@pytest.mark.parametrize("remat_policy", ["none", "full", "dots"])
def test_scan_and_remat_compute_the_same_function(remat_policy):
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    kwargs = dict(num_layers=3, num_heads=4, mask_fn=causal_mask)
    plain = Transformer(**kwargs)
    params = nn.meta.unbox(plain.init(jax.random.key(1), x)["params"])
    scanned = Transformer(**kwargs, scan_layers=True, remat_policy=remat_policy)
    stacked = _stack(params, 3)

    def loss(module, p):
        return (module.apply({"params": p}, x) ** 2).mean()

    np.testing.assert_allclose(loss(plain, params), loss(scanned, stacked), rtol=1e-6)
    grads = jax.grad(lambda p: loss(plain, p))(params)
    scanned_grads = jax.grad(lambda p: loss(scanned, p))(stacked)
    assert max_relative_difference(_stack(grads, 3), scanned_grads) < 1e-5


def test_scanned_parameters_carry_a_layers_axis():
    model = Transformer(num_layers=2, num_heads=2, scan_layers=True)
    boxed = model.init(jax.random.key(0), jnp.zeros((1, 4, 8)))["params"]
    assert boxed["resblocks"]["mlp"]["c_fc"]["kernel"].names == ("layers", "embed", "mlp")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_kv_cache_decoding_equals_the_full_forward(scan_layers):
    config = GPTConfig(vocab_size=50, context_length=12, width=32, layers=2, heads=4)
    config = config.replace(scan_layers=scan_layers)
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 50)
    params = GPT(config).init(jax.random.key(1), tokens)["params"]
    full = GPT(config).apply({"params": params}, tokens)

    decoder = GPT(config.replace(decode=True))
    cache = decoder.init(jax.random.key(1), tokens)["cache"]
    outputs, cache = decoder.apply(
        {"params": params, "cache": cache}, tokens[:, :4], mutable="cache"
    )
    outputs = [outputs]
    for t in range(4, 12):  # prefill 4 tokens, then one token at a time
        logits, cache = decoder.apply(
            {"params": params, "cache": cache["cache"]}, tokens[:, t : t + 1], mutable="cache"
        )
        outputs.append(logits)
    np.testing.assert_allclose(np.concatenate(outputs, 1), full, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    model = GPT(GPTConfig(context_length=8))
    with pytest.raises(ValueError, match="exceeds the context length 8"):
        model.init(jax.random.key(0), jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="unknown remat policy"):
        Transformer(num_layers=1, num_heads=1, remat_policy="some").init(
            jax.random.key(0), jnp.zeros((1, 2, 4))
        )


def _local_mask(q_pos, k_pos):
    """Causal within a window of 2 earlier positions: a second pattern for the tests below."""
    return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= q_pos[:, None] - 2)


def _local_attention(q, k, v):
    n = q.shape[1]
    return jax.nn.dot_product_attention(q, k, v, mask=_local_mask(jnp.arange(n), jnp.arange(n)))


@pytest.mark.parametrize("remat_policy", ["none", "full"])
def test_per_layer_patterns_scanned_equal_unscanned(remat_policy):
    """Layers 0 and 2 causal, layer 1 local, through attention_fn kernels or the dense path with
    the mask: the same function, and the scanned stack (lax.switch per layer) agrees."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 16))
    causal = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    kwargs = dict(
        num_layers=3,
        num_heads=2,
        mask_fn=(causal_mask, _local_mask),
        attention_fn=(causal, _local_attention),
        layer_patterns=(0, 1, 0),
        remat_policy=remat_policy,
    )
    plain = Transformer(**kwargs)
    params = nn.meta.unbox(plain.init(jax.random.key(1), x)["params"])
    dense = Transformer(**{**kwargs, "attention_fn": None})
    scanned = Transformer(**kwargs, scan_layers=True)
    one_pattern = Transformer(**{**kwargs, "layer_patterns": None})  # causal everywhere

    def loss(module, p):
        return (module.apply({"params": p}, x) ** 2).mean()

    results = [
        jax.jit(jax.value_and_grad(functools.partial(loss, module)))(p)
        for module, p in [(plain, params), (dense, params), (scanned, _stack(params, 3))]
    ]
    assert max_relative_difference(results[1][0], results[0][0]) < 1e-6
    assert max_relative_difference(results[1][1], results[0][1]) < 1e-5
    assert max_relative_difference(_stack(results[0][1], 3), results[2][1]) < 1e-5
    np.testing.assert_allclose(results[2][0], results[0][0], rtol=1e-6)
    assert abs(float(jax.jit(loss, static_argnums=0)(one_pattern, params)) - results[0][0]) > 1e-6


def test_attention_fn_rejects_a_data_mask():
    x = jnp.zeros((1, 3, 8))
    attention = MultiHeadAttention(
        num_heads=2, mask_fn=causal_mask, attention_fn=jax.nn.dot_product_attention
    )
    with pytest.raises(ValueError, match="an attention_fn takes no data-dependent mask"):
        attention.init(jax.random.key(0), x, mask=jnp.ones((1, 1, 3, 3), bool))
