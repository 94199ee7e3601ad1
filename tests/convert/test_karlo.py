"""Karlo (Kakao Brain's released unCLIP) conversion against diffusers' modules: the prior, the
text projection with the 64 px decoder UNet and the 256 px upsampler, on random weights in fp32,
and the released configurations' parameter counts.

The equivalence tests shrink the released configs (width, depth, image size) and keep every block
type, option and head pattern: the prior keeps its prd token, causal and padding masks and CLIP
statistics; the decoder keeps ResnetDownsample / SimpleCrossAttn blocks on the same levels (4 of
them), the SimpleCrossAttn middle, scale-shift norm, the identity class embedding that carries
the CLIP embeddings, learned variances (6 channels) and 4 extra context tokens; the upsampler
keeps its Resnet blocks, no attention, the added timestep embedding and 6 input channels.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxaigc import cli, plan
from jaxaigc.configs.saved import load_run
from jaxaigc.convert.karlo import (
    decoder_from_diffusers,
    load_karlo,
    prior_from_diffusers,
    super_res_from_diffusers,
)
from jaxaigc.models.decoder import Decoder, DecoderConfig
from jaxaigc.models.prior import Prior, PriorConfig, embedding_to_latent, latent_to_embedding
from jaxaigc.models.upsampler import Upsampler, UpsamplerConfig
from jaxaigc.objectives.unclip import prior_loss_fn
from jaxaigc.pipelines.unclip import decoder_init, load_stage, prior_init
from jaxaigc.sample.diffusion import sample_decoder, sample_prior, with_empty_caption
from jaxaigc.train.optim import make_optimizer
from tests.helpers import assert_logical_axes

torch = pytest.importorskip("torch", reason="the Karlo reference needs torch (the reference extra)")
diffusers = pytest.importorskip("diffusers", reason="the Karlo reference needs diffusers")

# The released decoder/config.json and text_proj/config.json (kakaobrain/karlo-v1-alpha, as
# diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py writes them); the released prior
# is PriorTransformer's defaults.
KARLO_UNET = {
    "sample_size": 64,
    "layers_per_block": 3,
    "down_block_types": [
        "ResnetDownsampleBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
        "SimpleCrossAttnDownBlock2D",
    ],
    "up_block_types": [
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "SimpleCrossAttnUpBlock2D",
        "ResnetUpsampleBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
    "block_out_channels": [320, 640, 960, 1280],
    "in_channels": 3,
    "out_channels": 6,
    "cross_attention_dim": 1536,
    "class_embed_type": "identity",
    "attention_head_dim": 64,
    "resnet_time_scale_shift": "scale_shift",
}
KARLO_TEXT_PROJ = {"clip_embeddings_dim": 768, "time_embed_dim": 1280, "cross_attention_dim": 1536}
# Reduced for CPU: channels / 5 (64-wide heads kept), 2 blocks a level, 16 px, context 48.
SMALL_UNET = {
    **KARLO_UNET,
    "sample_size": 16,
    "layers_per_block": 2,
    "block_out_channels": [64, 128, 192, 256],
    "cross_attention_dim": 48,
}
# super_res_first/config.json (super_res_last's is the same without sample_size).
KARLO_SUPER_RES = {
    "sample_size": 256,
    "layers_per_block": 3,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 4,
    "up_block_types": ["ResnetUpsampleBlock2D"] * 4,
    "block_out_channels": [320, 640, 960, 1280],
    "in_channels": 6,
    "out_channels": 3,
    "add_attention": False,
}
# Reduced: channels / 10, 2 blocks a level, 16 px.
SMALL_SUPER_RES = {
    **KARLO_SUPER_RES,
    "sample_size": 16,
    "layers_per_block": 2,
    "block_out_channels": [32, 64, 96, 128],
}
SMALL_TEXT_PROJ = {"clip_embeddings_dim": 24, "time_embed_dim": 256, "cross_attention_dim": 48}
# Reduced: 4 heads of 8 (released 32 of 64), 2 blocks (20), 24-d CLIP (768), 7 tokens (77).
SMALL_PRIOR = {
    "num_attention_heads": 4,
    "attention_head_dim": 8,
    "num_layers": 2,
    "embedding_dim": 24,
    "num_embeddings": 7,
}


def _randomise(module, seed: int):
    """Every parameter random, so a zero-initialised one (positions, prd token, CLIP statistics,
    the guidance embedding) or a swapped pair could not go unnoticed; norm scales around 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            norm = "norm" in name and p.ndim == 1
            p.copy_(noise * 0.1 + 1.0 if norm else noise * (0.5 if p.ndim == 1 else 0.2))
            if name == "clip_std":
                p.abs_().add_(0.5)
    return module.eval()


def _padding(batch: int, length: int) -> np.ndarray:
    """bool [batch, length]: row i keeps its first length - 2 i tokens (at least 2)."""
    return np.arange(length)[None] < np.maximum(length - 2 * np.arange(batch), 2)[:, None]


def _close(got, want, tol=1e-4):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() <= tol


def test_prior_matches_diffusers():
    reference = _randomise(diffusers.PriorTransformer(**SMALL_PRIOR), seed=0)
    config, variables = prior_from_diffusers(reference.state_dict(), SMALL_PRIOR)
    assert (config.width, config.layers, config.text_len) == (32, 2, 7)
    rng = np.random.default_rng(0)
    b, d, n = 3, 24, 7
    x, z_t = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    tokens, mask = rng.normal(size=(b, n, d)), _padding(b, n)
    t = np.array([0, 417, 999])
    with torch.no_grad():
        want = reference(
            torch.tensor(x, dtype=torch.float32),
            torch.tensor(t),
            proj_embedding=torch.tensor(z_t, dtype=torch.float32),
            encoder_hidden_states=torch.tensor(tokens, dtype=torch.float32),
            attention_mask=torch.tensor(mask),
        ).predicted_image_embedding.numpy()
        want_embedding = reference.post_process_latents(torch.tensor(want)).numpy()
    model = Prior(config)
    got = model.apply(variables, x, t, tokens, z_t, text_mask=jnp.asarray(mask))
    _close(got, want)
    params = variables["params"]
    _close(latent_to_embedding(config, params, got), want_embedding)
    _close(embedding_to_latent(config, params, want_embedding), want)
    # The padding matters: unmasked, the padded rows change.
    unmasked = model.apply(variables, x, t, tokens, z_t)
    assert np.abs(np.asarray(unmasked - got))[1:].max() > 1e-3


def test_decoder_matches_diffusers():
    unet = _randomise(diffusers.UNet2DConditionModel(**SMALL_UNET), seed=1)
    text_proj_cls = diffusers.pipelines.deprecated.unclip.text_proj.UnCLIPTextProjModel
    text_proj = _randomise(text_proj_cls(**SMALL_TEXT_PROJ), seed=2)
    n = 5
    config, variables = decoder_from_diffusers(
        unet.state_dict(), SMALL_UNET, text_proj.state_dict(), SMALL_TEXT_PROJ, text_len=n
    )
    assert config.attention_resolutions == (8, 4, 2)
    assert (config.channel_mult, config.out_channels) == ((1, 2, 3, 4), 6)
    rng = np.random.default_rng(1)
    b, d = 2, 24
    x = rng.normal(size=(b, 16, 16, 3))
    z_i, z_t = rng.normal(size=(b, d)), rng.normal(size=(b, d))
    tokens, mask = rng.normal(size=(b, n, d)), _padding(b, n)
    t = np.array([3, 870])

    def f32(a):
        return torch.tensor(np.asarray(a), dtype=torch.float32)

    with torch.no_grad():
        # Karlo's guidance: the unconditional half is the learned embedding for z_i.
        context, time = text_proj(
            image_embeddings=f32(z_i),
            prompt_embeds=f32(np.concatenate([z_t, z_t])),
            text_encoder_hidden_states=f32(np.concatenate([tokens, tokens])),
            do_classifier_free_guidance=True,
        )
        keep = torch.tensor(np.concatenate([mask, mask]))
        want = unet(
            f32(np.concatenate([x, x]).transpose(0, 3, 1, 2)),
            torch.tensor(np.concatenate([t, t])),
            encoder_hidden_states=context,
            class_labels=time,
            attention_mask=torch.nn.functional.pad(keep, (config.clip_tokens, 0), value=True),
        ).sample.numpy()
    model = Decoder(config)
    got = jax.jit(model.apply)(
        variables,
        jnp.concatenate([x, x]),
        jnp.concatenate([t, t]),
        jnp.concatenate([z_i, z_i]),
        text_tokens=jnp.concatenate([tokens, tokens]),
        text_embedding=jnp.concatenate([z_t, z_t]),
        text_mask=jnp.concatenate([mask, mask]),
        conditional=jnp.array([False] * b + [True] * b),
    )
    _close(got, want.transpose(0, 2, 3, 1))


def test_super_res_matches_diffusers():
    reference = _randomise(diffusers.UNet2DModel(**SMALL_SUPER_RES), seed=6)
    config, variables = super_res_from_diffusers(reference.state_dict(), SMALL_SUPER_RES)
    assert (config.scale_shift, config.middle_attention, config.out_channels) == (False, False, 3)
    rng = np.random.default_rng(2)
    x, low_res = rng.normal(size=(2, 16, 16, 3)), rng.normal(size=(2, 16, 16, 3))
    t = np.array([5, 640])
    with torch.no_grad():
        sample = torch.tensor(np.concatenate([x, low_res], -1).transpose(0, 3, 1, 2))
        want = reference(sample.float(), torch.tensor(t)).sample.numpy()
    got = jax.jit(Upsampler(config).apply)(variables, x, t, low_res)
    _close(got, want.transpose(0, 2, 3, 1))


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("component", ["prior", "decoder", "super_res"])
def test_released_parameter_counts(component):
    """The presets at the released sizes, on abstract shapes, against diffusers' modules built
    on torch's meta device: equal but for the prior's key biases (dropped, see convert.karlo)."""
    with torch.device("meta"):
        if component == "prior":
            references = [diffusers.PriorTransformer()]
            model = Prior(PriorConfig.from_name("karlo-prior"))
            dropped = model.config.layers * model.config.width
            init = prior_init(model)
        elif component == "super_res":
            references = [diffusers.UNet2DModel(**KARLO_SUPER_RES)]
            model, dropped = Upsampler(UpsamplerConfig.from_name("karlo-super-res")), 0

            def init(rng):
                image = jnp.zeros((1, 256, 256, 3))
                return model.init(rng, image, jnp.zeros((1,), jnp.int32), image)
        else:
            text_proj_cls = diffusers.pipelines.deprecated.unclip.text_proj.UnCLIPTextProjModel
            references = [
                diffusers.UNet2DConditionModel(**KARLO_UNET),
                text_proj_cls(**KARLO_TEXT_PROJ),
            ]
            model = Decoder(DecoderConfig.from_name("karlo-decoder"))
            dropped = 0
            init = decoder_init(model)
    want = sum(p.numel() for r in references for p in r.parameters())
    shapes = jax.eval_shape(init, jax.random.key(0))
    assert _count(shapes["params"]) == want - dropped
    assert_logical_axes(shapes["params"])
    assert want > (1_000_000_000 if component == "prior" else 600_000_000)


def _save_component(folder, module, config: dict, class_name: str) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": class_name, **config}))
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    save_file(state, folder / "diffusion_pytorch_model.safetensors")


def test_convert_karlo_pipeline_folder(tmp_path, capsys):
    """``jaxaigc convert karlo`` on a pipeline folder writes a prior run and a decoder run that
    load_stage reads back; component folders convert alone; wrong folders are named."""
    src = tmp_path / "karlo"
    prior = _randomise(diffusers.PriorTransformer(**SMALL_PRIOR), seed=3)
    text_proj_cls = diffusers.pipelines.deprecated.unclip.text_proj.UnCLIPTextProjModel
    text_proj = _randomise(text_proj_cls(**SMALL_TEXT_PROJ), seed=4)
    unet = _randomise(diffusers.UNet2DConditionModel(**SMALL_UNET), seed=5)
    _save_component(src / "prior", prior, SMALL_PRIOR, "PriorTransformer")
    _save_component(src / "text_proj", text_proj, SMALL_TEXT_PROJ, "UnCLIPTextProjModel")
    _save_component(src / "decoder", unet, SMALL_UNET, "UNet2DConditionModel")
    super_res = _randomise(diffusers.UNet2DModel(**SMALL_SUPER_RES), seed=6)
    _save_component(src / "super_res_last", super_res, SMALL_SUPER_RES, "UNet2DModel")
    cli.main(["convert", "karlo", str(src), str(tmp_path / "out")])
    assert load_run(tmp_path / "out" / "super_res_last")[0] == "karlo-super-res"
    assert set(load_karlo(src / "super_res_last")) == {"super_res_last"}
    for stage, (config, expected) in {
        "prior": prior_from_diffusers(prior.state_dict(), SMALL_PRIOR),
        "decoder": decoder_from_diffusers(
            unet.state_dict(), SMALL_UNET, text_proj.state_dict(), SMALL_TEXT_PROJ
        ),
    }.items():
        assert load_run(tmp_path / "out" / stage)[0] == f"karlo-{stage}"
        model, params, _ = load_stage(tmp_path / "out" / stage, stage)
        assert model.config == config
        jax.tree.map(np.testing.assert_array_equal, params, expected["params"])
    assert set(load_karlo(src / "decoder")) == {"decoder"}

    def refused(folder) -> str:
        with pytest.raises(SystemExit) as exit:
            cli.main(["convert", "karlo", str(folder), str(tmp_path / "refused")])
        assert exit.value.code == 2
        return capsys.readouterr().err

    assert "names class 'UnCLIPTextProjModel'" in refused(src / "text_proj")
    assert "no such folder" in refused(src / "prior" / "config.json")
    (src / "text_proj" / "config.json").unlink()
    assert "has no config.json" in refused(src / "decoder")


@pytest.mark.slow
def test_karlo_prior_plans_on_8_devices(devices):
    """``jaxaigc plan karlo-prior``: the released prior's training step compiled for 8 emulated
    devices (47 s here); its FLOPs are about 6 per parameter per token, and more for the
    attention and the full remat's second forward."""
    result = plan.plan("karlo-prior", devices=8, batch=16, chip="h100", device_list=devices)
    config = PriorConfig.from_name("karlo-prior")
    assert result["params"] == 1_021_989_120 and result["fits"]
    assert 1.0 < result["flops_per_example"] / (6 * result["params"] * config.length) < 1.5


def test_karlo_decoder_training_step_traces():
    """``jaxaigc plan karlo-decoder`` prepares the released decoder's step, whose loss traces on
    its batch spec (abstract shapes: compiling it for 8 CPU devices takes 11 minutes here)."""
    prepared = plan.prepare("karlo-decoder", devices=8)
    assert prepared.config.train.batch_size == 2048
    rng = jax.random.key(0)
    variables = jax.eval_shape(prepared.task.init, rng)
    batch = {
        name: jax.ShapeDtypeStruct((2, *shape), dtype)
        for name, (shape, dtype) in prepared.spec.items()
    }
    assert batch["text_tokens"].shape == (2, 77, 768) and batch["text_mask"].dtype == jnp.bool_
    loss, metrics = jax.eval_shape(prepared.task.loss_fn, variables["params"], batch, rng)
    assert loss.shape == () and "vlb" in metrics


def _tiny_prior() -> tuple[Prior, dict]:
    """The Karlo preset's options on a CPU-sized prior, randomly initialised."""
    prior = Prior(
        PriorConfig.from_name("karlo-prior").replace(
            embed_dim=8, text_len=5, text_width=8, width=16, layers=1, heads=2,
            dtype="float32", scan_layers=False, remat_policy="none",
        )
    )  # fmt: skip
    return prior, nn.meta.unbox(jax.jit(prior_init(prior))(jax.random.key(0))["params"])


def _tiny_decoder() -> tuple[Decoder, dict]:
    """The Karlo preset's options on a CPU-sized decoder, randomly initialised."""
    decoder = Decoder(
        DecoderConfig.from_name("karlo-decoder").replace(
            image_size=8, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
            attention_resolutions=(4,), head_channels=16, clip_dim=8, text_len=5,
            clip_text_width=8, context_width=16, dtype="float32", scan_layers=False,
            remat_policy="none", unet_remat_policy="none",
        )
    )  # fmt: skip
    return decoder, nn.meta.unbox(jax.jit(decoder_init(decoder))(jax.random.key(0))["params"])


def _caption(rng, b: int, n: int = 5, d: int = 8):
    tokens = jax.random.normal(rng, (b, n, d))
    embedding = jax.random.normal(jax.random.fold_in(rng, 1), (b, d))
    return tokens, embedding, jnp.asarray(_padding(b, n))


@pytest.mark.slow
def test_karlo_guidance_uses_the_empty_caption():
    """Karlo has no learned null caption: guidance's unconditional rows read the empty caption's
    CLIP features (the decoder's still take its learned null image embedding), and guiding
    without them is a named error."""
    (prior, prior_params), (decoder, decoder_params) = _tiny_prior(), _tiny_decoder()
    rng = jax.random.key(1)
    caption, empty = _caption(rng, 2), _caption(jax.random.fold_in(rng, 2), 1)
    conditional = jnp.array([True, False])
    (tokens, embedding, mask), left = with_empty_caption(caption, empty, conditional)
    assert left is None
    np.testing.assert_array_equal(tokens[0], caption[0][0])
    np.testing.assert_array_equal(tokens[1], empty[0][0])
    np.testing.assert_array_equal(mask[1], empty[2][0])

    # The decoder's unconditional rows: the null image embedding, the caption as given.
    x, t = jax.random.normal(rng, (2, 8, 8, 3)), jnp.array([10, 500])
    z_i = jax.random.normal(jax.random.fold_in(rng, 3), (2, 8))
    features = dict(zip(("text_tokens", "text_embedding", "text_mask"), caption, strict=True))
    apply = jax.jit(decoder.apply)
    got = apply({"params": decoder_params}, x, t, z_i, conditional=conditional, **features)
    null = jnp.stack([z_i[0], decoder_params["null_image_embedding"]])
    want = apply({"params": decoder_params}, x, t, null, **features)
    np.testing.assert_allclose(got, want, atol=1e-6)

    diffusion = prior.config.diffusion()
    with pytest.raises(ValueError, match="give empty_caption"):
        sample_prior(prior, prior_params, diffusion, *caption[:2], rng, guidance_scale=3.0)
    guided = sample_prior(
        prior, prior_params, diffusion, *caption[:2], rng, text_mask=caption[2], steps=3,
        guidance_scale=3.0, empty_caption=empty,
    )  # fmt: skip
    assert guided.shape == (2, 8) and np.isfinite(guided).all()
    images = sample_decoder(
        decoder, decoder_params, decoder.config.diffusion(), guided, rng, caption=caption,
        empty_caption=empty, steps=3, guidance_scale=4.0,
    )  # fmt: skip
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    with pytest.raises(ValueError, match="give empty_caption"):
        sample_decoder(
            decoder, decoder_params, decoder.config.diffusion(), guided, rng, caption=caption,
            guidance_scale=4.0,
        )  # fmt: skip


def test_what_does_not_convert_is_named():
    """Config values the models do not implement are named with their file before any weight
    is read; impossible option pairs are named by the configs."""
    cases = [
        ({**SMALL_UNET, "resnet_time_scale_shift": "default"}, "resnet_time_scale_shift='default'"),
        ({**SMALL_UNET, "up_block_types": SMALL_UNET["up_block_types"][::-1]}, "do not mirror"),
        ({**SMALL_UNET, "down_block_types": ["DownBlock2D"] * 4}, "down block 'DownBlock2D'"),
        ({**SMALL_UNET, "out_channels": 4}, "out_channels 4 is neither"),
    ]
    for config, message in cases:
        with pytest.raises(ValueError, match=message):
            decoder_from_diffusers({}, config, {}, SMALL_TEXT_PROJ)
    with pytest.raises(ValueError, match="text_proj config.json: cross_attention_dim=64"):
        decoder_from_diffusers({}, SMALL_UNET, {}, {**SMALL_TEXT_PROJ, "cross_attention_dim": 64})
    with pytest.raises(ValueError, match="prior config.json: norm_in_type='layer'"):
        prior_from_diffusers({}, {**SMALL_PRIOR, "norm_in_type": "layer"})
    with pytest.raises(ValueError, match="the prior state dict has no 'time_embedding"):
        prior_from_diffusers({}, SMALL_PRIOR)
    with pytest.raises(ValueError, match="super-res config.json: add_attention=True"):
        super_res_from_diffusers({}, {**SMALL_SUPER_RES, "add_attention": True})
    with pytest.raises(ValueError, match="text_drop 0.1 needs a learned null caption"):
        PriorConfig.from_name("karlo-prior", text_drop=0.1)
    with pytest.raises(ValueError, match='text_padding "null" needs the learned null caption'):
        PriorConfig.from_name("karlo-prior", text_padding="null")
    with pytest.raises(ValueError, match="not both: 2 text layers"):
        DecoderConfig.from_name("karlo-decoder", text_layers=2, text_vocab=10)
    with pytest.raises(ValueError, match="text_drop 0.5 needs a learned null caption"):
        DecoderConfig.from_name("karlo-decoder", text_drop=0.5)


def test_fine_tuning_keeps_the_clip_statistics():
    """The prior's loss standardises z_i with clip_mean / clip_std and an AdamW step with weight
    decay leaves them as converted (no gradient, no decay) while it moves the rest."""
    prior, params = _tiny_prior()
    params = {**params, "clip_mean": jnp.full((8,), 0.3), "clip_std": jnp.full((8,), 2.0)}
    rng = jax.random.key(4)
    tokens, embedding, mask = _caption(rng, 4)
    batch = dict(text_tokens=tokens, text_embedding=embedding, text_mask=mask)
    batch["image_embedding"] = jax.random.normal(jax.random.fold_in(rng, 5), (4, 8))
    loss_fn = prior_loss_fn(prior, prior.config.diffusion())
    grads, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(params, batch, rng)
    assert not np.any(grads["clip_mean"]) and not np.any(grads["clip_std"])
    optimizer, _ = make_optimizer(peak_lr=1e-2, total_steps=10, weight_decay=0.5)
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["clip_mean"], params["clip_mean"])
    np.testing.assert_array_equal(new["clip_std"], params["clip_std"])
    assert np.abs(np.asarray(new["x_proj"]["kernel"] - params["x_proj"]["kernel"])).max() > 0
