"""GPT: GPT-2 conversion against transformers, padded batches, the scalar head, logical axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.convert import gpt2_from_torch
from jaxaigc.models.gpt import GPT, GPTConfig
from tests.helpers import assert_logical_axes

TINY = GPTConfig(vocab_size=23, context_length=12, width=32, layers=2, heads=2)


def _random_gpt2(vocab: int, positions: int, width: int, layers: int, heads: int, **kw):
    """A transformers GPT2LMHeadModel with every weight random (norms around 1, biases nonzero)."""
    torch = pytest.importorskip("torch", reason="the GPT-2 reference needs torch")
    transformers = pytest.importorskip(
        "transformers", reason="the GPT-2 reference needs transformers (the reference extra)"
    )
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=width, n_layer=layers, n_head=heads, **kw
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.3 if p.ndim > 1 else 0.1
            p.copy_(torch.randn_like(p) * scale + float("ln" in name and name.endswith("weight")))
    return torch, model


@pytest.mark.parametrize(("heads", "scan_layers"), [(3, False), (None, True)])
def test_gpt2_logits_match_transformers(heads, scan_layers):
    # width 128: 2 heads of 64 when inferred; 3 heads given explicitly needs width 96.
    width = 96 if heads else 128
    torch, reference = _random_gpt2(97, 24, width, 2, heads or 2, n_inner=3 * width)
    config, variables = gpt2_from_torch(
        reference.state_dict(), num_heads=heads, scan_layers=scan_layers
    )
    assert (config.heads, config.mlp_ratio, config.tie_embeddings) == (heads or 2, 3.0, True)
    assert "head" not in variables["params"]
    tokens = np.random.default_rng(0).integers(0, 97, (3, 24))
    # Left padding: rows 0 and 1 start with pads; transformers gets the mask and position ids.
    valid = np.ones(tokens.shape, bool)
    valid[0, :5], valid[1, :2] = False, False
    mask = torch.tensor(valid.astype(np.int64))
    with torch.no_grad():
        want = reference(torch.tensor(tokens)).logits.numpy()
        want_padded = reference(
            torch.tensor(tokens), attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(0)
        ).logits.numpy()
    model = GPT(config)
    got = np.asarray(model.apply(variables, jnp.asarray(tokens)))
    got_padded = np.asarray(model.apply(variables, jnp.asarray(tokens), valid=jnp.asarray(valid)))
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    diff = np.abs(got_padded - want_padded)[valid].max()
    assert diff / np.abs(want_padded).max() < 1e-4


def test_untied_head_and_bad_state_dicts():
    torch, reference = _random_gpt2(31, 8, 64, 1, 1)
    sd = dict(reference.state_dict())
    sd["lm_head.weight"] = torch.randn_like(sd["lm_head.weight"])
    config, variables = gpt2_from_torch(sd)
    assert not config.tie_embeddings and config.heads == 1
    tokens = torch.arange(8)[None] % 31
    reference.lm_head.weight = torch.nn.Parameter(sd["lm_head.weight"])  # untie in the reference
    with torch.no_grad():
        want = reference(tokens).logits.numpy()
    got = np.asarray(GPT(config).apply(variables, jnp.asarray(tokens.numpy())))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="width 64 is not divisible by num_heads=3"):
        gpt2_from_torch(sd, num_heads=3)
    with pytest.raises(ValueError, match="'transformer.wpe.weight'|'wpe.weight'"):
        gpt2_from_torch({k: v for k, v in sd.items() if "wpe" not in k})
    with pytest.raises(ValueError, match="unexpected keys.*extra"):
        gpt2_from_torch({**sd, "extra": sd["lm_head.weight"]})


def test_padded_rows_equal_the_unpadded_sequence():
    """Outputs at a left- or right-padded row's real tokens equal the sequence alone, for the LM
    and the scalar head, with the KV cache too."""
    tokens = jnp.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    for head in ("lm", "scalar"):
        config = TINY.replace(head=head)
        model = GPT(config)
        params = model.init(jax.random.key(0), tokens)["params"]
        alone = model.apply({"params": params}, tokens[:, :6])
        padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens[:, :6], tokens[:, :1]], 1)
        valid = jnp.array([[False] * 3 + [True] * 6 + [False]])
        out = model.apply({"params": params}, padded, valid=valid)
        np.testing.assert_allclose(out[:, 3:9], alone, rtol=1e-5, atol=1e-6)
        assert out.shape == ((1, 10, 23) if head == "lm" else (1, 10))

    # Decode: prefill the padded prompt, then the rest one token at a time.
    model = GPT(TINY)
    params = model.init(jax.random.key(0), tokens)["params"]
    full = model.apply({"params": params}, tokens[:, :8])
    decoder = GPT(TINY.replace(decode=True))
    cache = decoder.init(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["cache"]
    padded, valid = jnp.concatenate([jnp.zeros((1, 2), jnp.int32), tokens[:, :4]], 1), valid[:, 1:7]
    out, variables = decoder.apply(
        {"params": params, "cache": cache}, padded, valid=valid, mutable="cache"
    )
    steps = [out[:, 2:]]
    for t in range(4, 8):
        out, variables = decoder.apply(
            {"params": params, **variables}, tokens[:, t : t + 1], mutable="cache"
        )
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_packed_rows_equal_each_sequence_alone():
    """Sequences packed in one row (``segments``) give the outputs of each sequence alone: their
    positions restart and they do not see each other; pads after them change nothing."""
    config = TINY.replace(context_length=12)
    model = GPT(config)
    first, second = jnp.array([[5, 6, 7, 8, 9]]), jnp.array([[10, 11, 12, 13]])
    params = model.init(jax.random.key(0), first)["params"]
    packed = jnp.concatenate([first, second, jnp.zeros((1, 3), jnp.int32)], 1)
    segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    out = model.apply({"params": params}, packed, segments=segments)
    np.testing.assert_allclose(out[:, :5], model.apply({"params": params}, first), atol=1e-5)
    np.testing.assert_allclose(out[:, 5:9], model.apply({"params": params}, second), atol=1e-5)
    with pytest.raises(ValueError, match="segments .packed rows. take neither valid"):
        model.apply({"params": params}, packed, segments=segments, valid=segments > 0)


def test_branches_equal_prefix_and_each_continuation_alone():
    """Continuations after a shared prefix (``branches``) give the outputs of prefix +
    continuation alone, also in a row longer than the context (whose padding stays finite); a
    second sequence in the row does not see them."""
    config = TINY.replace(context_length=6, head="scalar")
    model = GPT(config)
    prefix, a, b, other = [5, 6, 7], [8, 9], [10, 11, 12], [13, 14]
    params = model.init(jax.random.key(0), jnp.zeros((1, 6), jnp.int32))["params"]
    row = jnp.array([prefix + a + b + other + [0] * 7])
    segments = jnp.array([[1] * 8 + [2] * 2 + [0] * 7])
    branches = jnp.array([[0, 0, 0, 1, 1, 2, 2, 2] + [0] * 9])
    out = model.apply({"params": params}, row, segments=segments, branches=branches)

    def alone(tokens):
        return model.apply({"params": params}, jnp.array([tokens]))[0]

    np.testing.assert_allclose(out[0, :5], alone(prefix + a), atol=1e-5)
    np.testing.assert_allclose(out[0, 5:8], alone(prefix + b)[3:], atol=1e-5)
    np.testing.assert_allclose(out[0, 8:10], alone(other), atol=1e-5)
    assert jnp.isfinite(out).all()
    with pytest.raises(ValueError, match="branches .* need segments"):
        model.apply({"params": params}, row, branches=branches)


@pytest.mark.parametrize("changes", [{}, {"head": "scalar"}, {"tie_embeddings": True}])
def test_every_parameter_has_logical_axes(changes):
    boxed = GPT(TINY.replace(**changes)).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert_logical_axes(boxed["params"])
    names = set(boxed["params"])
    assert ("score" in names) == ("head" in changes)
    assert ("head" in names) == (not changes)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="unknown head 'value'"):
        GPTConfig(head="value")
    with pytest.raises(ValueError, match="width 30 is not divisible by heads 4"):
        GPTConfig(width=30, heads=4)
    with pytest.raises(ValueError, match=r"valid has shape \(1, 3\)"):
        GPT(TINY).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), valid=jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="unknown GPT model 'gpt3-2b'"):
        GPTConfig.from_name("gpt3-2b")


@pytest.mark.parametrize(
    ("name", "count"),
    [
        # transformers' GPT2LMHeadModel counts (124,439,808; 1,557,611,200) less the key biases
        # (width per layer), which change no output and are not kept (jaxaigc.convert.gpt2).
        ("gpt2-small", 124_439_808 - 12 * 768),
        ("gpt2-xl", 1_557_611_200 - 48 * 1600),
        ("gpt3-1.3b", 1_315_674_112),  # "1.3B" in Brown et al. Table 2.1
    ],
)
def test_presets_have_the_released_sizes(name, count):
    config = GPTConfig.from_name(name)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    params = jax.eval_shape(GPT(config).init, jax.random.key(0), tokens)["params"]
    assert sum(x.size for x in jax.tree.leaves(params)) == count
    assert config.tie_embeddings and "head" not in params
    assert GPTConfig.from_name(name, layers=2).layers == 2
