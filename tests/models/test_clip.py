import functools
import importlib.util
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc import parallel
from jaxaigc.convert.clip import (
    clip_from_torch,
    clip_to_torch,
    load_clip,
    openai_constructor_args,
)
from jaxaigc.models.clip import CLIP, PRESETS, CLIPConfig, clamp_logit_scale
from jaxaigc.nn.resnet import blur_pool
from jaxaigc.objectives.contrastive import clip_loss_fn
from jaxaigc.train import sizing
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import make_train_step
from tests.helpers import assert_trees_equal, max_relative_difference

# Parameter counts of OpenAI's clip/model.py CLIP for each preset (sum of numel over
# model.parameters(), built on torch's meta device: see test_openai_parameter_counts).
OPENAI_PARAMS = {
    "RN50": 102_007_137,
    "RN101": 119_688_033,
    "RN50x4": 178_300_601,
    "RN50x16": 290_979_217,
    "RN50x64": 623_258_305,
    "ViT-B/32": 151_277_313,
    "ViT-B/16": 149_620_737,
    "ViT-L/14": 427_616_513,
    "ViT-L/14@336px": 427_944_193,
}
# Small vocabulary and context for the CPU equivalence tests; 64 px gives the ResNet a 2x2 grid.
TINY = {
    "tiny-rn": dict(
        vocab_size=500, context_length=16, image_resolution=64, vision_layers=(2, 1, 1, 1)
    ),
    "tiny-vit": dict(vocab_size=500, context_length=16),
}


def key_bias_count(config: CLIPConfig) -> int:
    """OpenAI's key biases, which jaxaigc drops (softmax ignores them)."""
    text = config.transformer_layers * config.transformer_width
    if config.is_resnet:
        return text + 32 * config.vision_width  # the attention pool's
    return text + config.vision_layers * config.vision_width


def dummy_inputs(config: CLIPConfig, batch: int = 2):
    r = config.image_resolution
    return jnp.zeros((batch, r, r, 3)), jnp.zeros((batch, config.context_length), jnp.int32)


def abstract_init(config: CLIPConfig):
    """(outputs, boxed variables) of ``init`` as shapes only."""
    model = CLIP(config)
    return jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *dummy_inputs(config)))


def random_variables(config: CLIPConfig, seed: int = 0):
    """Random arrays of the model's variable shapes (no compilation)."""
    rng = np.random.default_rng(seed)
    _, boxed = abstract_init(config)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype), nn.meta.unbox(boxed))


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def relative_error(ours, reference) -> float:
    """max |ours - reference| / max |reference|."""
    reference = np.asarray(reference, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - reference).max() / np.abs(reference).max())


@pytest.mark.parametrize("name", list(OPENAI_PARAMS))
def test_preset_shapes_and_parameter_counts(name):
    config = CLIPConfig.from_name(name)
    (logits_per_image, logits_per_text), variables = abstract_init(config)
    assert logits_per_image.shape == logits_per_text.shape == (2, 2)
    assert count(variables["params"]) == OPENAI_PARAMS[name] - key_bias_count(config)
    assert ("batch_stats" in variables) == config.is_resnet


@pytest.mark.parametrize(
    "name, changes",
    [
        ("tiny-vit", {}),
        ("tiny-vit", {"scan_layers": True}),
        ("tiny-rn", {}),
        ("tiny-rn", {"vision_layers": (2, 1, 1, 1), "scan_layers": True}),
    ],
)
def test_every_parameter_has_logical_axis_names(name, changes):
    _, variables = abstract_init(CLIPConfig.from_name(name, **changes))
    known = {logical for logical, _ in parallel.DEFAULT_RULES} | {None}
    leaves = jax.tree_util.tree_leaves_with_path(
        variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    for path, leaf in leaves:
        assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == leaf.value.ndim, jax.tree_util.keystr(path)
        assert set(leaf.names) <= known, (jax.tree_util.keystr(path), leaf.names)


def test_config_errors_name_the_problem():
    assert set(PRESETS) == set(OPENAI_PARAMS) | {"tiny-vit", "tiny-rn"}
    with pytest.raises(
        ValueError, match=r"unknown CLIP model 'ViT-H/14'; known: .*'RN50'.*'tiny-vit'"
    ):
        CLIPConfig.from_name("ViT-H/14")
    with pytest.raises(ValueError, match="not a multiple of the patch size 7"):
        CLIPConfig.from_name("tiny-vit", vision_patch_size=7)
    with pytest.raises(ValueError, match="unknown blur 'gauss'"):
        CLIPConfig.from_name("tiny-rn", blur="gauss")
    assert CLIPConfig.from_name("RN50").replace(blur="binomial").blur == "binomial"


def test_bad_inputs_fail_at_trace_time_with_both_shapes():
    config = CLIPConfig.from_name("tiny-vit")
    model = CLIP(config)
    _, variables = abstract_init(config)

    def trace(method, shape, dtype=jnp.float32):
        jax.eval_shape(
            lambda v, x: model.apply(v, x, method=method),
            variables,
            jax.ShapeDtypeStruct(shape, dtype),
        )

    for shape in [(2, 32, 32), (2, 3, 32, 32), (2, 64, 64, 3), (2, 32, 32, 1)]:
        expected = rf"\[batch, 32, 32, 3\] \(NHWC\), got \({', '.join(map(str, shape))}\)"
        with pytest.raises(ValueError, match=expected):
            trace("encode_image", shape)
    with pytest.raises(ValueError, match="exceeds the context length 77"):
        trace("encode_text", (2, 78), jnp.int32)
    with pytest.raises(ValueError, match="must be integer"):
        trace("encode_text", (2, 77))


def test_init_apply_and_train_mode_batch_stats():
    config = CLIPConfig.from_name("tiny-rn")
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    tokens = jax.random.randint(jax.random.key(1), (4, 77), 0, config.vocab_size)
    variables = jax.jit(CLIP(config).init)(jax.random.key(2), images, tokens)
    params = nn.meta.unbox(variables["params"])
    assert float(params["logit_scale"]) == pytest.approx(math.log(1 / 0.07))
    for stage in range(1, 5):
        assert not np.any(params["visual"][f"layer{stage}_0"]["bn3"]["scale"])

    # Inference uses the running statistics that init created.
    features = jax.jit(lambda v: CLIP(config).apply(v, images, method="encode_image"))(variables)
    assert features.shape == (4, 64) and np.all(np.isfinite(features))

    model = CLIP(config)
    train_step = jax.jit(
        lambda v: model.apply(v, images, tokens, train=True, mutable=["batch_stats"])
    )
    (logits, _), first = train_step(variables)
    assert logits.shape == (4, 4)
    # PyTorch's momentum 0.1: running = 0.9 running + 0.1 batch. From mean 0 and var 1, one step
    # gives 0.1 m and 0.9 + 0.1 v; a second on the same batch 0.19 m and 0.9 (0.9 + 0.1 v) + 0.1 v.
    _, second = train_step({**variables, **first})
    for one, two in zip(
        jax.tree.leaves(first, is_leaf=lambda x: isinstance(x, dict) and "mean" in x),
        jax.tree.leaves(second, is_leaf=lambda x: isinstance(x, dict) and "mean" in x),
        strict=True,
    ):
        np.testing.assert_allclose(two["mean"], 1.9 * one["mean"], rtol=1e-4, atol=1e-6)
        batch_var = (one["var"] - 0.9) / 0.1
        np.testing.assert_allclose(two["var"], 0.9 * one["var"] + 0.1 * batch_var, rtol=1e-4)


def test_resnet_scan_and_remat_match_the_plain_model_in_train_mode():
    config = CLIPConfig.from_name("tiny-rn", **TINY["tiny-rn"])
    scanned_config = config.replace(scan_layers=True, remat_policy="full")
    variables = random_variables(config)
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])
    # The converter's layout change: blocks 1.. of a stage stacked into layer{stage}_rest.
    _, scanned = clip_from_torch(clip_to_torch(config, variables), scan_layers=True)
    assert scanned["params"]["visual"]["layer1_rest"]["conv1"]["kernel"].shape == (1, 1, 1, 32, 8)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, config.vocab_size)

    def loss_and_stats(cfg, v):
        def loss(params):
            (logits, _), state = CLIP(cfg).apply(
                {**v, "params": params}, images, tokens, train=True, mutable=["batch_stats"]
            )
            return logits.sum(), state

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])

    (loss, state), grads = loss_and_stats(config, variables)
    (scanned_loss, scanned_state), scanned_grads = loss_and_stats(scanned_config, scanned)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
    _, expected = clip_from_torch(
        clip_to_torch(config, {"params": grads, **state}), scan_layers=True
    )
    assert max_relative_difference(scanned_state, {"batch_stats": expected["batch_stats"]}) < 1e-5
    # The attention pool's query and key gradients are near-cancelling sums over its few, similar
    # tokens: an fp32 reordering alone moves them by ~5e-4 relative; the other leaves by ~3e-6.
    pooled = ("query", "key")
    attn, expected_attn = (
        g["visual"]["attnpool"]["attn"] for g in (scanned_grads, expected["params"])
    )
    assert (
        max_relative_difference({k: attn[k] for k in pooled}, {k: expected_attn[k] for k in pooled})
        < 3e-3
    )
    for k in pooled:
        attn[k] = expected_attn[k] = {}
    assert max_relative_difference(scanned_grads, expected["params"]) < 1e-4


def test_binomial_blur_pool_matches_a_direct_convolution():
    x = np.random.default_rng(0).normal(size=(2, 8, 6, 3)).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    taps = np.array([1.0, 2.0, 1.0]) / 4
    expected = sum(
        taps[i] * taps[j] * padded[:, i : i + 8 : 2, j : j + 6 : 2]
        for i in range(3)
        for j in range(3)
    )
    np.testing.assert_allclose(blur_pool(jnp.asarray(x), 2, "binomial"), expected, atol=1e-6)
    np.testing.assert_allclose(
        blur_pool(jnp.asarray(x), 2, "avg"), x.reshape(2, 4, 2, 3, 2, 3).mean((2, 4)), atol=1e-6
    )


def test_binomial_blur_runs_and_differs_from_avg():
    config = CLIPConfig.from_name("tiny-rn", image_resolution=64)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = random_variables(config)  # random bn3 scales: the residual branches matter
    variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # variances > 0

    def encode(blur):
        model = CLIP(config.replace(blur=blur))
        return jax.jit(lambda v: model.apply(v, images, method="encode_image"))(variables)

    avg, binomial = encode("avg"), encode("binomial")
    assert np.all(np.isfinite(binomial))
    assert relative_error(binomial, avg) > 1e-2


def test_safetensors_round_trip_is_exact(tmp_path):
    from safetensors.numpy import save_file

    for name, changes in [("tiny-rn", {"scan_layers": True}), ("tiny-vit", {"scan_layers": True})]:
        config = CLIPConfig.from_name(name, **TINY[name], **changes)
        variables = random_variables(config)
        state_dict = clip_to_torch(config, variables)
        save_file(state_dict, tmp_path / "clip.safetensors")
        loaded_config, loaded = load_clip(tmp_path / "clip.safetensors", **changes)
        assert loaded_config == config
        assert_trees_equal(loaded, variables)


def test_load_and_convert_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CLIP checkpoint"):
        load_clip(tmp_path / "missing.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_clip(tmp_path / "bad.safetensors")
    (tmp_path / "clip.ckpt").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint suffix '.ckpt'"):
        load_clip(tmp_path / "clip.ckpt")

    config = CLIPConfig.from_name("tiny-vit")
    state_dict = clip_to_torch(config, random_variables(config))
    with pytest.raises(
        ValueError, match="not an OpenAI CLIP state dict: it has no 'ln_final.weight'"
    ):
        clip_from_torch({k: v for k, v in state_dict.items() if k != "ln_final.weight"})
    with pytest.raises(ValueError, match="no 'visual.ln_post.bias'"):
        clip_from_torch({k: v for k, v in state_dict.items() if k != "visual.ln_post.bias"})
    with pytest.raises(ValueError, match=r"unexpected tensors in the state dict: \['extra'\]"):
        clip_from_torch({**state_dict, "extra": np.zeros(1)})


# Equivalence with OpenAI's clip/model.py (PyTorch, float32, random weights).


@pytest.fixture(scope="module")
def openai():
    """(torch, OpenAI's clip.model module), imported by path: clip/__init__ needs torchvision."""
    torch = pytest.importorskip(
        "torch", reason="torch is not installed: pip install -e '.[reference]'"
    )
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openai-clip is not installed: pip install --no-deps openai-clip==1.0.1")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return torch, module


def openai_model(openai, config: CLIPConfig, *, device=None):
    torch, module = openai
    args = openai_constructor_args(config)
    if device is not None:
        with torch.device(device):
            return module.CLIP(*args)
    return module.CLIP(*args).eval()


def randomize(openai, model, seed: int = 0):
    """Random BatchNorm statistics and affine parameters (bn3 scales non-zero), biases and
    LayerNorm parameters, which OpenAI initialises to constants."""
    torch, _ = openai
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=g))
                module.bias.normal_(0, 0.1, generator=g)
                module.running_mean.normal_(0, 0.1, generator=g)
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
        for name, param in model.named_parameters():
            if name.endswith("bias") and "bn" not in name and "downsample.1" not in name:
                param.normal_(0, 0.1, generator=g)
            elif ".ln_" in name or name.startswith("ln_"):
                param.add_(torch.randn(param.shape, generator=g) * 0.1)
    return model


def openai_inputs(openai, config: CLIPConfig, batch: int = 2):
    torch, _ = openai
    g = torch.Generator().manual_seed(1)
    r, n, vocab = config.image_resolution, config.context_length, config.vocab_size
    images = torch.randn(batch, 3, r, r, generator=g)
    tokens = torch.randint(1, vocab - 1, (batch, n), generator=g)
    tokens[0, 5], tokens[0, 6:] = vocab - 1, 0  # end-of-text early, then padding
    tokens[1:, -1] = vocab - 1
    return images, tokens


def compare_with_openai(openai, config: CLIPConfig, **changes) -> tuple[float, float]:
    """Relative errors of (encode_image, encode_text) against OpenAI's model."""
    torch, _ = openai
    reference = randomize(openai, openai_model(openai, config))
    images, tokens = openai_inputs(openai, config)
    with torch.no_grad():
        ref_image = reference.encode_image(images).numpy()
        ref_text = reference.encode_text(tokens).numpy()
    converted, variables = clip_from_torch(reference.state_dict(), **changes)
    assert converted == config.replace(**changes)
    model = CLIP(converted)
    image = jax.jit(lambda v, x: model.apply(v, x, method="encode_image"))(
        variables, jnp.asarray(images.numpy().transpose(0, 2, 3, 1))
    )
    text = jax.jit(lambda v, t: model.apply(v, t, method="encode_text"))(
        variables, jnp.asarray(tokens.numpy(), jnp.int32)
    )
    errors = relative_error(image, ref_image), relative_error(text, ref_text)
    print(f"relative error vs OpenAI: image {errors[0]:.1e}, text {errors[1]:.1e}")  # pytest -s
    return errors


@pytest.mark.parametrize(
    "name, changes",
    [
        ("tiny-rn", {}),
        ("tiny-rn", {"scan_layers": True}),
        ("tiny-vit", {}),
        ("tiny-vit", {"scan_layers": True}),
    ],
)
def test_matches_openai_clip(openai, name, changes):
    config = CLIPConfig.from_name(name, **TINY[name])
    image_error, text_error = compare_with_openai(openai, config, **changes)
    assert image_error < 1e-4 and text_error < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50", "ViT-B/32"])
def test_matches_openai_clip_at_full_size(openai, name):
    image_error, text_error = compare_with_openai(
        openai, CLIPConfig.from_name(name), scan_layers=True
    )
    assert image_error < 1e-4 and text_error < 1e-4


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_torch_round_trip(openai, name):
    """torch -> jaxaigc -> torch reproduces every tensor but the (zeroed) key biases, and OpenAI's
    model loads the result strictly and computes the same features."""
    torch, _ = openai
    config = CLIPConfig.from_name(name, **TINY[name])
    reference = randomize(openai, openai_model(openai, config))
    original = {k: v.numpy() for k, v in reference.state_dict().items()}
    _, variables = clip_from_torch(reference.state_dict())
    back = clip_to_torch(config, variables)
    assert set(back) == set(original)
    for key, expected in original.items():
        expected = expected.copy()
        if key.endswith("k_proj.bias"):
            expected[:] = 0
        elif key.endswith("in_proj_bias"):
            third = len(expected) // 3
            expected[third : 2 * third] = 0
        np.testing.assert_array_equal(back[key], expected, err_msg=key)

    reloaded = openai_model(openai, config)
    reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    images, tokens = openai_inputs(openai, config)
    with torch.no_grad():
        for method in ("encode_image", "encode_text"):
            inputs = images if method == "encode_image" else tokens
            expected = getattr(reference, method)(inputs).numpy()
            assert relative_error(getattr(reloaded.eval(), method)(inputs).numpy(), expected) < 1e-5


@pytest.mark.filterwarnings("ignore")  # torch.jit's tracer and deprecation warnings
def test_torchscript_and_state_dict_files(openai, tmp_path):
    torch, _ = openai
    config = CLIPConfig.from_name("tiny-vit", **TINY["tiny-vit"])
    reference = randomize(openai, openai_model(openai, config))
    expected_config, expected = clip_from_torch(reference.state_dict())
    torch.save(reference.state_dict(), tmp_path / "state_dict.pt")
    images, tokens = openai_inputs(openai, config)
    torch.jit.save(torch.jit.trace(reference, (images, tokens)), tmp_path / "scripted.pt")
    for filename in ("state_dict.pt", "scripted.pt"):
        loaded_config, loaded = load_clip(tmp_path / filename)
        assert loaded_config == expected_config
        assert_trees_equal(loaded, expected)
    (tmp_path / "bad.pt").write_bytes(b"\x80 garbage")
    with pytest.raises(ValueError, match="neither a TorchScript archive nor a state dict"):
        load_clip(tmp_path / "bad.pt")


def test_openai_parameter_counts(openai):
    for name, expected in OPENAI_PARAMS.items():
        model = openai_model(openai, CLIPConfig.from_name(name), device="meta")
        assert sum(p.numel() for p in model.parameters()) == expected, name


# Pod sizing: lower and compile the train step on abstract inputs over an FSDP mesh.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["RN50"])  # ViT-B/32: tests/test_plan.py
def test_full_size_train_step_compiles_sharded(devices, name):
    mesh = parallel.make_mesh({"fsdp": 8}, devices=devices)
    rules = parallel.make_rules({"conv_in": "fsdp"})
    config = CLIPConfig.from_name(name, dtype="bfloat16", remat_policy="full", scan_layers=True)
    model = CLIP(config)
    r = config.image_resolution

    def init(rng):
        return model.init(rng, jnp.zeros((1, r, r, 3)), jnp.zeros((1, 1), jnp.int32))

    tx = optax.adamw(5e-4, weight_decay=0.2)
    step = make_train_step(
        clip_loss_fn(model),
        tx,
        rng=jax.random.key(1),
        has_model_state=True,
        constrain_params=clamp_logit_scale,
    )
    example = {"image": ((r, r, 3), jnp.float32), "tokens": ((config.context_length,), jnp.int32)}
    result = sizing.size_train_step(step, init, tx, example, mesh, rules, global_batch=16)
    assert result["params"] == OPENAI_PARAMS[name] - key_bias_count(config)
    # Parameters (4 bytes each) and both Adam moments (8 more) are split 8 ways, not replicated.
    images = 16 * 224 * 224 * 3 * 4
    assert result["argument"] - images < 1.1 * 12 * result["params"] / 8
    _, _, state = create_sharded_state(init, tx, jax.random.key(0), mesh, rules, materialize=False)
    variables = {"params": state.params, **state.model_state}
    batch = sizing.abstract_batch(example, 16, mesh)
    for method, inputs in (("encode_image", batch["image"]), ("encode_text", batch["tokens"])):
        encode = functools.partial(model.apply, method=method)
        figures = sizing.size_inference(encode, (variables, inputs), mesh, rules)
        assert figures["argument"] - images < 1.1 * 4 * result["params"] / 8
