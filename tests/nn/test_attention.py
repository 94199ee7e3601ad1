"""The choice between cuDNN's and XLA's attention (the platform mocked: no GPU here), the masks
MultiHeadAttention hands each, and lengths against the explicit masks they stand for."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.nn import MultiHeadAttention, SeqLengths, causal_mask, select_attention
from jaxaigc.nn.attention import dot_product_attention
from jaxaigc.nn.sparse import DALLEMask

CASE = dict(platform="gpu", dtype=jnp.bfloat16, head_dim=64, q_len=16, k_len=16)


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"causal": True, "masked": False}, "cudnn"),
        ({"causal": False, "masked": False}, "cudnn"),  # ViT, the UNet's self-attention
        ({"causal": True, "masked": False, "dtype": jnp.float16}, "cudnn"),
        ({"causal": True, "masked": False, "platform": "cpu"}, "xla"),
        ({"causal": True, "masked": False, "platform": "tpu"}, "xla"),
        ({"causal": True, "masked": False, "dtype": jnp.float32}, "xla"),
        ({"causal": True, "masked": True}, "xla"),  # left padding, packed rows, DALL-E's masks
        ({"causal": True, "masked": False, "head_dim": 36}, "xla"),
        ({"causal": True, "masked": False, "head_dim": 256}, "xla"),
        ({"causal": True, "masked": False, "k_len": 20}, "xla"),
        ({"causal": False, "masked": False, "k_len": 20}, "cudnn"),  # cross-attention
    ],
)
def test_auto_takes_cudnn_only_where_it_can(changes, expected):
    case = {**CASE, **changes}
    assert select_attention("auto", **case) == expected
    assert select_attention("xla", **case) == "xla"
    if expected == "cudnn":
        assert select_attention("cudnn", **case) == "cudnn"
    else:
        with pytest.raises(ValueError, match="attention_impl 'cudnn' cannot compute"):
            select_attention("cudnn", **case)


def test_unknown_implementation_is_named():
    with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
        select_attention("flash", **CASE, causal=True, masked=False)
    with pytest.raises(ValueError, match="cuDNN runs on a CUDA GPU, not on 'cpu'"):
        select_attention("cudnn", **{**CASE, "platform": "cpu"}, causal=True, masked=False)


@pytest.fixture
def on_a_mocked_gpu(monkeypatch):
    """``jax.default_backend()`` says "gpu"; ``jax.nn.dot_product_attention`` records its
    keywords and computes with XLA (a CPU has no cuDNN to trace)."""
    calls = []
    xla = jax.nn.dot_product_attention

    def recording(q, k, v, **kwargs):
        calls.append(kwargs)
        return xla(q, k, v, **{**kwargs, "implementation": "xla"})

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    return calls


def test_multi_head_attention_hands_cudnn_what_it_takes(on_a_mocked_gpu):
    """Where cuDNN can compute it, a cuDNN call is staged out beside XLA's and the choice made
    when the program is lowered (here for the CPU: XLA's, equal to the float32 reference)."""
    calls = on_a_mocked_gpu
    lengths = jnp.array([5, 8], jnp.int32)
    padding = (jnp.arange(8) < lengths[:, None])[:, None, None, :]
    cases = [  # mask_fn, mask, dtype, heads; cuDNN?
        (causal_mask, None, jnp.bfloat16, 2, True),  # GPT's and CLIP's text tower
        (causal_mask, SeqLengths(lengths, lengths), jnp.bfloat16, 2, True),  # right padding
        (causal_mask, padding, jnp.bfloat16, 2, False),  # the same padding as a mask
        (DALLEMask("row", 4, 2), None, jnp.bfloat16, 2, False),  # DALL-E's dense path
        (causal_mask, None, jnp.float32, 2, False),
        (causal_mask, None, jnp.bfloat16, 8, False),  # 4-wide heads
    ]
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    for mask_fn, mask, dtype, heads, cudnn in cases:
        module = MultiHeadAttention(num_heads=heads, mask_fn=mask_fn, dtype=dtype)
        params = module.init(jax.random.key(1), x, mask=mask)["params"]
        calls.clear()
        apply = jax.jit(
            lambda p, x, mask=mask, module=module: module.apply({"params": p}, x, mask=mask)
        )
        staged = "platform_index" in str(jax.make_jaxpr(apply)(params, x))
        cudnn_calls = [c for c in calls if c["implementation"] == "cudnn"]
        assert (staged, len(cudnn_calls)) == ((True, 1) if cudnn else (False, 0))
        if cudnn:
            assert cudnn_calls[0]["is_causal"] and cudnn_calls[0]["mask"] is None
        reference = module.clone(dtype=jnp.float32).apply({"params": params}, x, mask=mask)
        np.testing.assert_allclose(apply(params, x), reference, atol=0.05)


def test_lengths_equal_the_explicit_padding_mask():
    """Causal attention with right padding as lengths (cuDNN's form, here through XLA) equals the
    explicit causal & padding mask at every real query; padded queries give zeros."""
    q, k, v = (jax.random.normal(jax.random.key(i), (3, 8, 2, 16)) for i in range(3))
    lengths = jnp.array([8, 5, 1], jnp.int32)
    real = jnp.arange(8)[None, :] < lengths[:, None]  # (b, t)
    explicit = causal_mask(jnp.arange(8), jnp.arange(8))[None, None] & real[:, None, None, :]

    def loss(attention, q, k, v):  # over real queries only
        return jnp.sum(jnp.where(real[:, :, None, None], jnp.sin(attention(q, k, v)), 0))

    def by_lengths(q, k, v):
        padding = SeqLengths(lengths, lengths)
        return dot_product_attention(q, k, v, causal=True, lengths=padding, impl="xla")

    def by_mask(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=explicit)

    out = by_lengths(q, k, v)
    np.testing.assert_allclose(
        out * real[:, :, None, None], by_mask(q, k, v) * real[..., None, None]
    )
    assert not np.any(np.asarray(out)[~np.asarray(real)])
    grads = [jax.grad(loss, argnums=(1, 2, 3))(f, q, k, v) for f in (by_lengths, by_mask)]
    jax.tree.map(np.testing.assert_allclose, *grads)
    padding = real[:, None, :, None] & real[:, None, None, :]
    np.testing.assert_array_equal(SeqLengths(lengths, lengths).as_mask(8, 8), padding)


def test_cpu_numerics_equal_the_explicit_causal_mask():
    """On CPU ``is_causal`` builds the same mask XLA applied before: bit-identical outputs."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 9, 2, 8)) for i in range(3))
    mask = causal_mask(jnp.arange(9), jnp.arange(9))[None, None]
    np.testing.assert_array_equal(
        dot_product_attention(q, k, v, causal=True),
        jax.nn.dot_product_attention(q, k, v, mask=mask),
    )


def test_lengths_through_the_module_equal_the_mask_and_refuse_decode_mode():
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    lengths = jnp.array([6, 3], jnp.int32)
    attention = MultiHeadAttention(num_heads=2, mask_fn=causal_mask)
    params = nn.meta.unbox(attention.init(jax.random.key(1), x)["params"])
    by_lengths = attention.apply({"params": params}, x, mask=SeqLengths(key=lengths))
    padding = (jnp.arange(6) < lengths[:, None])[:, None, None, :]
    by_mask = attention.apply({"params": params}, x, mask=padding)
    np.testing.assert_allclose(by_lengths, by_mask, rtol=1e-6, atol=1e-6)
    decoder = MultiHeadAttention(num_heads=2, mask_fn=causal_mask, decode=True)
    with pytest.raises(ValueError, match="SeqLengths padding is not for decode mode"):
        decoder.init(jax.random.key(1), x, mask=SeqLengths(key=lengths))


def test_half_precision_xla_path_equals_jax_and_differentiates_in_bfloat16():
    """The bfloat16 XLA path gives ``jax.nn.dot_product_attention``'s outputs; its gradients
    differ by the rounding of the scores' gradient to bfloat16, and its jaxpr has no float32
    matmul."""
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 8, 2, 16), jnp.bfloat16) for i in range(3))
    padding = jnp.arange(8)[None, :] < jnp.array([8, 6])[:, None]
    mask = padding[:, None, None, :]

    def ours(q, k, v):
        return dot_product_attention(q, k, v, mask=mask, causal=True, impl="xla")

    def jax_attention(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True)

    np.testing.assert_array_equal(ours(q, k, v), jax_attention(q, k, v))

    def loss(attend, q, k, v):
        return jnp.sum(jnp.sin(attend(q, k, v).astype(jnp.float32)))

    grads = [jax.grad(loss, argnums=(1, 2, 3))(f, q, k, v) for f in (ours, jax_attention)]
    for ours_grad, jax_grad in zip(*grads, strict=True):
        expected = np.asarray(jax_grad, np.float32)
        atol = 2e-2 * np.abs(expected).max()
        np.testing.assert_allclose(np.asarray(ours_grad, np.float32), expected, atol=atol)
    jaxpr = jax.make_jaxpr(jax.grad(lambda q: ours(q, k, v).astype(float).sum()))(q)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(x.aval.dtype == jnp.bfloat16 for e in dots for x in e.invars)
