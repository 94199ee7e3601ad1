"""``jaxaigc plan``: FLOPs counted in the compiled program (loops times their trip counts, equal
to XLA's cost analysis where there is no loop), the recipes' batch specs equal to real batches,
the recipes' and two presets' steps planned on 8 emulated devices, bad input named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc import cli, plan
from jaxaigc.run import get_config
from jaxaigc.systems import clip, instructgpt, lm


def _xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def _flops(fn, *args) -> float:
    return plan.hlo_flops(jax.jit(fn).lower(*args).compile().as_text())


def test_flops_of_dots_and_convolutions_equal_xla_and_loops_count_each_trip():
    x, y = jnp.ones((64, 96)), jnp.ones((96, 32))
    assert _flops(jnp.matmul, x, y) == 2 * 64 * 96 * 32 == _xla_flops(jnp.matmul, x, y)
    batched = jnp.ones((4, 64, 96))
    assert _flops(jnp.matmul, batched, y) == 4 * 2 * 64 * 96 * 32

    image, kernel = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 4, 12))  # 2 groups of 4 channels

    def conv(a, b):
        return jax.lax.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=2,
        )  # fmt: skip

    assert _flops(conv, image, kernel) == 2 * (2 * 16 * 16 * 12) * (3 * 3 * 4)

    def scanned(a):
        return jax.lax.scan(lambda c, _: (jnp.tanh(c @ c), None), a, None, length=10)[0]

    square = jnp.ones((32, 32))
    assert _flops(scanned, square) == 10 * 2 * 32**3
    assert _xla_flops(scanned, square) < 2 * 2 * 32**3  # XLA counts the body once


@pytest.mark.parametrize(
    ("recipe", "batch_of"),
    [
        ("lm", lambda config: next(lm.build(config)[2])),
        ("clip", lambda config: next(clip.build(config)[2])),
        ("instructgpt", lambda config: next(instructgpt.build_ppo(config, None, None)[1])),
    ],
)
def test_batch_specs_are_the_training_batches(recipe, batch_of):
    config = get_config(recipe, quick=True)
    spec = {
        "lm": lm.batch_spec,
        "clip": clip.batch_spec,
        "instructgpt": instructgpt.ppo_batch_spec,
    }[recipe](config)
    if recipe == "instructgpt":
        config = instructgpt.ppo_stage_config(config, "ppo_ptx")
    batch = batch_of(config)
    got = {name: (tuple(np.shape(x)[1:]), np.asarray(x).dtype) for name, x in batch.items()}
    assert got == {name: (tuple(shape), np.dtype(dtype)) for name, (shape, dtype) in spec.items()}


@pytest.mark.parametrize("name", ["lm", "dvae", "unclip.prior", "instructgpt"])
def test_recipe_steps_plan_on_8_devices(devices, name):
    result = plan.plan(name, devices=8, mesh="fsdp=2,data=-1", chip="tpu-v5e", device_list=devices)
    assert result["mesh"] == {"data": 4, "fsdp": 2, "tensor": 1}
    assert result["params"] > 0 and result["flops"] > 0 and 0 < result["peak"] < plan.GIB
    assert result["fits"] and result["smallest_fsdp"] == 1
    assert result["step_seconds_at_mfu"] == pytest.approx(result["flops"] / (8 * 197e12 * plan.MFU))
    text = plan.format_plan(result)
    assert "TPU v5e: 16 GiB HBM -> fits" in text and f"{result['params'] / 1e6:,.1f}M" in text


@pytest.mark.parametrize(("name", "steps"), [("unclip.prior", 64), ("unclip.decoder", 2 * 25)])
def test_diffusion_samplers_count_every_step(devices, name, steps):
    """The DDIM loop's FLOPs are its body's (XLA's count, which also has the elementwise work)
    times the network evaluations: its steps, twice under guidance."""
    result = plan.plan(name, devices=2, sample=True, device_list=devices)
    assert result["sampler"].startswith("DDIM")
    assert 0.5 * steps < result["flops"] / result["xla_cost_analysis_flops"] < 1.2 * steps


def test_kv_cache_decoding_counts_every_token(devices):
    """About 2 FLOPs per parameter for each prompt and drawn token (the tied LM head included)."""
    result = plan.plan("instructgpt", devices=2, sample=True, device_list=devices)
    config = get_config("instructgpt")
    tokens = config.data.prompt_length + config.ppo.algorithm.response_length
    assert 0.8 < result["flops_per_example"] / (2 * result["params"] * tokens) < 2.0


@pytest.mark.slow
def test_presets_plan_on_8_devices(devices):
    vit = plan.plan("ViT-B/32", devices=8, chip="h100", device_list=devices)
    # OpenAI's 151,277,313 less the key biases (12 x 768 + 12 x 512), which change no output;
    # training is over 3x the forward of both encoders (~15 GFLOPs)
    assert vit["mesh"]["fsdp"] == 8 and vit["params"] == 151_277_313 - 12 * (768 + 512)
    assert vit["flops_per_example"] > 3 * 14e9
    # Parameters (4 bytes) and both Adam moments (8 more) split 8 ways beside the batch (the few
    # dimensions 8 does not divide stay whole: a replicated state would be 8x this)
    batch = 32_768 // 8 * (224 * 224 * 3 * 4 + 77 * 4)
    assert vit["argument"] - batch < 1.15 * 12 * vit["params"] / 8
    ppo = plan.plan("gpt2-small", devices=8, chip="h100", device_list=devices)
    # The policy and the value model are trained: twice GPT-2 small (124M, no key biases)
    assert ppo["params"] == pytest.approx(2 * 124e6, rel=0.01)
    assert ppo["flops_per_token"] > 6 * 124e6


FULL_SIZE = [name for name, target in plan.TARGETS.items() if target.recipe != target.system]


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_recipes_plan_as_they_launch(name):
    prepared = plan.prepare(name, devices=8)
    assert prepared.sizes == {"data": 1, "fsdp": 8, "tensor": 1}  # the recipe's own mesh
    config = get_config(name)
    batch = config.ppo.batch_size if prepared.target.step == "ppo" else config.train.batch_size
    assert prepared.config.train.batch_size == batch  # the PPO stage's prompts per iteration


@pytest.mark.slow
def test_a_full_size_recipe_compiles(devices):
    result = plan.plan("clip-vit-b32", devices=8, batch=64, chip="h100", device_list=devices)
    preset = plan.plan("ViT-B/32", devices=8, batch=64, device_list=devices)
    assert result["params"] == preset["params"] and result["fits"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope", "--devices", "8"], "unknown recipe or preset 'nope'"),
        (["clip", "--devices", "8", "--chip", "tpu-v9"], "unknown chip 'tpu-v9'"),
        (["clip", "--devices", "8", "--mesh", "data=3"], "needs 3 devices but 8"),
        (["clip", "--devices", "8", "--mesh", "fsdp"], "is not axis=size"),
        (["lm", "--devices", "8", "--batch", "100"], "batch 100 does not divide"),
        (["instructgpt", "--devices", "8", "--accum", "2"], "takes no accumulation"),
        (["clip", "--devices", "8", "--sample"], "clip has no sampler"),
    ],
)
def test_bad_input_is_named(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["plan", *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
