"""Benchmark suite: every system's training step and sampler on this machine, one table.

    jaxaigc bench suite [--parts clip-vit-b16,gpt-rollout] [--size full|cpu]
                        [--part-timeout 120,clip-rn50=240] [--out runs/bench]

Each part runs in a process of its own with its own time limit (a slow compile costs its rows,
not the table), after the ``ceiling`` part: the best jitted matmul in the compute dtype (bf16
8192^3 on an accelerator, fp32 on a CPU), the denominator of every row. As each part ends its rows
are appended to ``OUT/suite.jsonl`` and ``OUT/suite.md`` (headed by the device, the package and
driver versions and the command), and every process's output to ``OUT/suite.log``.

Rows: FLOPs counted in the compiled program (``benchmark.counted_flops``: dots and convolutions,
loop bodies times their trip counts, so rematerialised forwards count too), the median time
(``benchmark.median_times``), its fraction of the ceiling, the time ``jaxaigc plan`` predicts
(40% of the vendor's peak on a chip plan knows; elsewhere FLOPs / ceiling, the header says which),
the PyTorch peer's time on the same job where it is installed, tokens/s for samplers and the
first call's compile time. Compute is bf16 with fp32 parameters on accelerators (the models'
``dtype``; ``torch.autocast`` for the peers), fp32 on CPUs.

``--size full`` fills one accelerator (batch per device): CLIP ViT-B/16 and RN50 at 256, the
DALL-E transformer at 1.0B parameters (the paper's layout and row / column / conv layers, width
2048, 20 layers) at 16 captions, Karlo's decoder UNet at 64 px and its prior, GPT-2 medium's PPO
minibatch update and KV-cache rollout at batch 64. ``--size cpu``: the same parts at widths and
batches that run in seconds on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import os
import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxaigc import parallel
from jaxaigc.benchmark import (
    SuiteTable,
    clip_inputs,
    counted_flops,
    dalle_pytorch_attention,
    environment,
    matmul_ceiling,
    median_times,
    openai_clip_module,
    openai_clip_step,
    predicted_seconds,
    report_row,
    run_part,
)
from jaxaigc.compile_options import jit_inference, training_options
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step, make_train_step


@dataclasses.dataclass(frozen=True)
class Size:
    """The shapes of every part at one size."""

    clip: dict[str, str]  # row label -> CLIP preset
    clip_batch: int
    dalle: dict  # DALLEConfig.from_name("paper-12b", **dalle) (the paper's layout and schedule)
    dalle_batch: int
    layer_batch: int  # the row-attention layer against DALLE-pytorch's
    decoder: tuple[str, dict]  # DecoderConfig preset and changes
    decoder_batch: int
    prior: tuple[str, dict]
    prior_batch: int
    gpt: tuple[str, dict]  # GPTConfig preset and changes (policy, value, rollout)
    ppo_batch: int
    prompt: int  # prompt tokens of the PPO batch and the rollout
    response: int  # response tokens (PPO) and tokens drawn (rollout)
    rollout_batch: int
    repeats: int
    settle: float  # seconds between timed turns on a CPU (benchmark.median_times)


SIZES = {
    "full": Size(
        clip={"ViT-B/16": "ViT-B/16", "RN50": "RN50"},
        clip_batch=256,
        dalle=dict(width=2048, layers=20, heads=32),
        dalle_batch=16,
        layer_batch=8,
        decoder=("karlo-decoder", {}),
        decoder_batch=32,
        prior=("karlo-prior", {}),
        prior_batch=256,
        gpt=("gpt2-medium", {}),
        ppo_batch=32,
        prompt=128,
        response=128,
        rollout_batch=64,
        repeats=3,
        settle=1.0,
    ),
    "cpu": Size(
        clip={"ViT-B/16": "tiny-vit", "RN50": "tiny-rn"},
        clip_batch=4,
        dalle=dict(text_len=16, image_side=8, width=64, layers=4, heads=2, text_vocab=512,
                   image_vocab=256),
        dalle_batch=2,
        layer_batch=1,
        decoder=("tiny", {}),
        decoder_batch=2,
        prior=("tiny", {}),
        prior_batch=4,
        gpt=("gpt2-small", dict(vocab_size=512, context_length=64, width=64, layers=2, heads=2)),
        ppo_batch=4,
        prompt=16,
        response=16,
        rollout_batch=4,
        repeats=2,
        settle=0.2,
    ),
}  # fmt: skip


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def compute_dtype() -> str:
    return "float32" if on_cpu() else "bfloat16"


# --- Timing and the PyTorch peers ------------------------------------------------------------


def timed(size: Size, fn: Callable[[], object]) -> float:
    """Median seconds of ``fn`` (blocking) after its warm-up call."""
    settle = size.settle if on_cpu() else 0.0
    return median_times([fn], size.repeats, settle)[0]


class NoPeer(Exception):
    """Why a row has no PyTorch peer: a package not installed, a torch without CUDA."""


def torch_peer(package: str | None):
    """``(torch, device, sync, autocast)`` for a peer from ``package`` (None: checked by its
    loader), on the device JAX computes on; raises :class:`NoPeer` where there is none."""
    for name in ("torch", package):
        if name and importlib.util.find_spec(name) is None:
            raise NoPeer(f"{name} not installed")
    import torch

    device = "cpu" if on_cpu() else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise NoPeer(f"torch {torch.__version__} has no CUDA here")
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count())
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    def autocast():
        if on_cpu():
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16)

    return torch, device, sync, autocast


def time_peer(size: Size, row: str, name: str, make: Callable[[], Callable[[], None]]) -> None:
    """Reports the peer's median time on ``row`` (``make()`` builds the timed call) or why
    there is none."""
    try:
        fn = make()
    except (NoPeer, ModuleNotFoundError) as error:
        report_row(row, peer=f"{name}: {error}")
        return
    report_row(row, peer=name)
    report_row(row, peer_seconds=timed(size, fn))


class FlopCount:
    """The FLOPs of ``fn(*args)`` (:func:`jaxaigc.benchmark.counted_flops`). On an accelerator
    the count needs a CPU compile of its own: it runs on a thread from construction, beside the
    accelerator's compile and timing, which spend most of their time in C++ or waiting."""

    def __init__(self, fn: Callable, args: tuple):
        # Shapes now: the arguments' buffers may be donated before the thread reads them.
        self.fn = fn
        self.args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
        self.out: dict = {}
        self.thread = None
        if not on_cpu():
            self.thread = threading.Thread(target=self._count, daemon=True)
            self.thread.start()

    def _count(self) -> None:
        try:
            self.out["flops"] = counted_flops(self.fn, *self.args)
        except Exception as error:  # re-raised in the part's own thread by result()
            self.out["error"] = error

    def result(self, compiled) -> float:
        if self.thread is None:  # on a CPU the compiled program is the one counted
            return counted_flops(self.fn, *self.args, compiled=compiled)
        self.thread.join()
        if "error" in self.out:
            raise self.out["error"]
        return self.out["flops"]


def measure(
    size: Size, row: str, fn: Callable, args: tuple, params, *,
    compile: Callable[[], jax.stages.Compiled] | None = None,
    call: Callable[[jax.stages.Compiled], None] | None = None,
) -> None:  # fmt: skip
    """Reports ``row``'s parameter count, compile time, median time and FLOPs of ``fn(*args)``,
    each as soon as it is known. ``compile`` defaults to ``jit_inference``, ``call`` to calling
    the compiled program on ``args`` and blocking."""
    report_row(row, params=sum(x.size for x in jax.tree.leaves(params)))
    count = FlopCount(fn, args)
    start = time.perf_counter()
    compiled = compile() if compile else jit_inference(fn).lower(*args).compile()
    report_row(row, compile_seconds=time.perf_counter() - start)
    call = call or (lambda compiled: jax.block_until_ready(compiled(*args)))
    report_row(row, seconds=timed(size, lambda: call(compiled)))
    report_row(row, flops=count.result(compiled))


def measure_step(size: Size, row: str, init, loss_fn, batch, **step_options) -> None:
    """:func:`measure` of the library's AdamW step on one device as training builds and jits it
    (``create_sharded_state``, ``make_train_step`` with ``step_options``, ``jit_train_step``)."""
    tx = optax.adamw(1e-4)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = parallel.make_rules()
    state, shardings, _ = create_sharded_state(init, tx, jax.random.key(0), mesh, rules)
    step = make_train_step(loss_fn, tx, rng=jax.random.key(1), **step_options)
    batch = parallel.shard_batch(batch, mesh)
    jitted = jit_train_step(step, mesh, rules, shardings, batch)
    holder = {"state": state}  # each call donates the state it is given

    def call(compiled):
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready(metrics)

    measure(
        size, row, step, (state, batch), state.params,
        compile=lambda: jitted.lower(state, batch).compile(), call=call,
    )  # fmt: skip


# --- The parts --------------------------------------------------------------------------------


def part_ceiling(size: Size) -> None:
    n = 8192 if not on_cpu() else (4096 if size is SIZES["full"] else 2048)
    dtype = jnp.dtype(compute_dtype())
    flops_per_s = matmul_ceiling(n, dtype=dtype)
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    report_row(
        "matmul ceiling", shape=f"[{n}, {n}] @ [{n}, {n}] {dtype.name}", device=device,
        device_kind=jax.devices()[0].device_kind, flops=2 * n**3, seconds=2 * n**3 / flops_per_s,
    )  # fmt: skip


def part_clip(size: Size, label: str) -> None:
    """CLIP's ``encode_image`` and its training step (symmetric InfoNCE, AdamW), against OpenAI's
    ``clip/model.py`` on the same batch."""
    from jaxaigc.convert.clip import openai_constructor_args
    from jaxaigc.models.clip import CLIP, CLIPConfig, clamp_logit_scale
    from jaxaigc.objectives.contrastive import clip_loss_fn

    config = CLIPConfig.from_name(size.clip[label], dtype=compute_dtype())
    b = size.clip_batch
    shape = f"{size.clip[label]}, batch {b}, {config.image_resolution} px, {config.dtype}"
    model = CLIP(config)
    images, tokens = clip_inputs(config, b)
    encode_row, step_row = f"{label} encode_image", f"{label} train step"
    report_row(encode_row, shape=shape)
    report_row(step_row, shape=shape)

    variables = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), images[:1], tokens[:1]))
    x = jax.device_put(images)

    def encode(v, x):
        return model.apply(v, x, method="encode_image")

    measure(size, encode_row, encode, (variables, x), variables["params"]["visual"])

    measure_step(
        size, step_row, lambda _: variables, clip_loss_fn(model),
        {"image": images, "tokens": tokens}, has_model_state=True,
        constrain_params=clamp_logit_scale,
    )  # fmt: skip

    try:
        torch, device, sync, autocast = torch_peer(None)
        openai = openai_clip_module()
    except (NoPeer, ModuleNotFoundError) as error:
        for row in (encode_row, step_row):
            report_row(row, peer=f"OpenAI CLIP: {error}")
        return
    t_model = openai.CLIP(*openai_constructor_args(config)).to(device)
    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    t_tokens = torch.from_numpy(tokens.astype(np.int64)).to(device)
    optimizer = torch.optim.AdamW(t_model.parameters(), lr=1e-4)

    def torch_encode():
        def call():
            t_model.eval()
            with torch.no_grad(), autocast():
                t_model.encode_image(t_images)
            sync()

        return call

    def torch_step():
        return openai_clip_step(torch, t_model, t_images, t_tokens, optimizer, autocast, sync)

    time_peer(size, encode_row, "OpenAI CLIP", torch_encode)
    time_peer(size, step_row, "OpenAI CLIP", torch_step)


def dalle_config(size: Size):
    from jaxaigc.models.dalle import DALLEConfig

    return DALLEConfig.from_name("paper-12b", **size.dalle, dtype=compute_dtype())


def dalle_init(model):
    """``init(rng)`` of a DALL-E transformer, as ``jaxaigc.pipelines.dalle.init_fn`` (the
    pipelines import the data packages, which an accelerator's image may lack)."""
    cfg = model.config
    text, image = np.zeros((1, cfg.text_len), np.int32), np.zeros((1, cfg.image_len), np.int32)
    return lambda rng: model.init(rng, text, image)


def dalle_shape(config, batch: int) -> str:
    return (
        f"{config.layers} x {config.width}, {config.attention} attention, "
        f"{config.text_len} + {config.image_len} tokens, batch {batch}, {config.dtype}"
    )


def dalle_tokens(config, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    text = rng.integers(1, config.text_vocab, (batch, config.text_len)).astype(np.int32)
    image = rng.integers(0, config.image_vocab, (batch, config.image_len)).astype(np.int32)
    return text, image


def part_dalle_step(size: Size) -> None:
    """The DALL-E transformer's training step (text and image cross-entropy, AdamW)."""
    from jaxaigc.models.dalle import DALLE
    from jaxaigc.objectives.dalle import dalle_loss_fn

    config, row = dalle_config(size), "DALL-E train step"
    report_row(row, shape=dalle_shape(config, size.dalle_batch))
    model = DALLE(config)
    text, image = dalle_tokens(config, size.dalle_batch)
    measure_step(size, row, dalle_init(model), dalle_loss_fn(model), dict(text=text, image=image))
    report_row(row, peer="none (a layer against DALLE-pytorch: part dalle-layer)")


def part_dalle_sample(size: Size) -> None:
    """The DALL-E transformer's KV-cache sampler: every image token of a grid per caption."""
    from jaxaigc.models.dalle import DALLE
    from jaxaigc.sample.decode import sample_image_tokens

    config, row = dalle_config(size), "DALL-E KV-cache sampler"
    b = size.dalle_batch
    report_row(row, shape=dalle_shape(config, b), tokens=b * config.image_len)
    params = jax.jit(dalle_init(DALLE(config)))(jax.random.key(0))["params"]
    params = nn.meta.unbox(params)
    text = jax.device_put(dalle_tokens(config, b)[0])

    def sample(params, text):
        return sample_image_tokens(config, params, text, rng=jax.random.key(1))

    measure(size, row, sample, (params, text), params)
    report_row(row, peer="none")


def part_dalle_layer(size: Size) -> None:
    """One row-attention layer of the DALL-E transformer (projections included, forward and
    backward) against DALLE-pytorch's ``SparseAxialCausalAttention(axis=0)``, which attends
    within an image row only where the paper's row mask reaches into the previous row too."""
    from jaxaigc.nn.attention import MultiHeadAttention
    from jaxaigc.nn.sparse import DALLEMask, sparse_attention

    config, row = dalle_config(size), "DALL-E row-attention layer (portable kernel), fwd + bwd"
    b, n, width, heads = size.layer_batch, config.length, config.width, config.heads
    report_row(row, shape=f"width {width}, {heads} heads, {n} tokens, batch {b}, {config.dtype}")
    geometry = dict(text_len=config.text_len, image_side=config.image_side)
    layer = MultiHeadAttention(
        heads, mask_fn=DALLEMask("row", **geometry), dtype=jnp.dtype(config.dtype),
        attention_fn=functools.partial(sparse_attention, kind="row", **geometry),
    )  # fmt: skip
    x = jax.random.normal(jax.random.key(0), (b, n, width))
    g = jax.random.normal(jax.random.key(1), (b, n, width))
    params = jax.jit(layer.init)(jax.random.key(2), x[:, :8])["params"]
    params = nn.meta.unbox(params)

    def grads(params, x, g):  # of sum(layer(x) * g): the backward pass from cotangent g
        loss = lambda params, x: jnp.sum(layer.apply({"params": params}, x) * g)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(params, x)

    # Compiled with a train step's XLA options (compile_options.training_options).
    options = training_options(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
    jitted = jax.jit(grads, compiler_options=options)
    compile = lambda: jitted.lower(params, x, g).compile()  # noqa: E731
    measure(size, row, grads, (params, x, g), params, compile=compile)

    def torch_layer():
        torch, device, sync, autocast = torch_peer("dalle_pytorch")
        module = dalle_pytorch_attention()
        t_layer = module.SparseAxialCausalAttention(
            dim=width, seq_len=n - 1, image_size=config.image_side, axis=0, heads=heads,
            dim_head=width // heads,
        ).to(device)  # fmt: skip
        t_x = torch.from_numpy(np.array(x)).to(device).requires_grad_(True)
        t_g = torch.from_numpy(np.array(g)).to(device)

        def call():
            t_layer.zero_grad(set_to_none=True)
            t_x.grad = None
            with autocast():
                out = t_layer(t_x)
            (out.float() * t_g).sum().backward()
            sync()

        return call

    time_peer(size, row, "DALLE-pytorch SparseAxialCausalAttention", torch_layer)


def part_unclip_decoder(size: Size) -> None:
    """The unCLIP decoder's UNet training step at 64 px (diffusion loss, AdamW) against diffusers'
    ``UNet2DModel`` of the same levels, widths, blocks and attention (an embedding added to the
    timestep embedding, as the decoder's projected image embedding is; no cross-attention to the
    decoder's 4 image tokens and caption)."""
    from jaxaigc.models.decoder import Decoder, DecoderConfig
    from jaxaigc.objectives.unclip import decoder_loss_fn

    name, changes = size.decoder
    cfg = DecoderConfig.from_name(name, **changes, dtype=compute_dtype())
    b, r, row = size.decoder_batch, cfg.image_size, "unCLIP decoder UNet train step"
    report_row(row, shape=f"{name}: {cfg.model_channels} x {cfg.channel_mult}, {r} px, "
               f"batch {b}, {cfg.dtype}")  # fmt: skip
    rng = np.random.default_rng(0)
    embedding = rng.standard_normal((b, cfg.clip_dim)).astype(np.float32)
    batch = {
        "image": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
        "image_embedding": embedding / np.linalg.norm(embedding, axis=-1, keepdims=True),
    }
    if cfg.clip_text_width:  # Karlo: CLIP's caption features
        batch["text_tokens"] = rng.standard_normal((b, cfg.text_len, cfg.clip_text_width))
        batch["text_tokens"] = batch["text_tokens"].astype(np.float32)
        batch["text_embedding"] = batch["image_embedding"]
        batch["text_mask"] = np.ones((b, cfg.text_len), bool)
    elif cfg.text_layers:
        batch["text_tokens"] = rng.integers(1, cfg.text_vocab, (b, cfg.text_len), dtype=np.int32)
    model = Decoder(cfg)
    one = {key: value[:1] for key, value in batch.items()}

    def init(rng):  # as jaxaigc.pipelines.unclip.decoder_init (see dalle_init)
        caption = {key: one[key] for key in ("text_tokens", "text_embedding", "text_mask")
                   if cfg.clip_text_width}  # fmt: skip
        text = one["text_tokens"] if cfg.text_layers else None
        t = np.zeros((1,), np.int32)
        return model.init(rng, one["image"], t, one["image_embedding"], text, **caption)

    measure_step(size, row, init, decoder_loss_fn(model, cfg.diffusion()), batch)

    def torch_unet():
        torch, device, sync, autocast = torch_peer("diffusers")
        from diffusers import UNet2DModel

        sides = [r // 2**i for i in range(len(cfg.channel_mult))]
        attends = [side in cfg.attention_resolutions for side in sides]
        unet = UNet2DModel(
            sample_size=r, in_channels=3, out_channels=6 if cfg.variance == "learned_range" else 3,
            block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
            layers_per_block=cfg.num_res_blocks,
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attends),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attends[::-1]),
            attention_head_dim=cfg.head_channels, norm_num_groups=cfg.groups,
            resnet_time_scale_shift="scale_shift", downsample_type="resnet",
            upsample_type="resnet", class_embed_type="identity",
        ).to(device)  # fmt: skip
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        x = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(device)
        # "identity": the image embedding, already at the timestep embedding's width.
        z = torch.randn(b, 4 * cfg.model_channels, device=device)
        t = torch.randint(0, 1000, (b,), device=device)
        noise = torch.randn_like(x)

        def call():
            with autocast():
                out = unet(x + noise, t, class_labels=z).sample
            loss = torch.nn.functional.mse_loss(out[:, :3].float(), noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()

        return call

    time_peer(size, row, "diffusers UNet2DModel", torch_unet)


def part_unclip_prior(size: Size) -> None:
    """The unCLIP prior's training step (its diffusion loss on CLIP image embeddings, AdamW)."""
    from jaxaigc.models.prior import Prior, PriorConfig
    from jaxaigc.objectives.unclip import prior_loss_fn

    name, changes = size.prior
    cfg = PriorConfig.from_name(name, **changes, dtype=compute_dtype())
    b, row = size.prior_batch, "unCLIP prior train step"
    report_row(row, shape=f"{name}: {cfg.layers} x {cfg.width}, {cfg.text_len} caption tokens, "
               f"batch {b}, {cfg.dtype}")  # fmt: skip
    rng = np.random.default_rng(0)

    def unit(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    batch = {
        "text_tokens": rng.standard_normal((b, cfg.text_len, cfg.text_width)).astype(np.float32),
        "text_embedding": unit(b, cfg.embed_dim),
        "image_embedding": unit(b, cfg.embed_dim),
        "text_mask": np.ones((b, cfg.text_len), bool),
    }
    model = Prior(cfg)

    def init(rng):  # as jaxaigc.pipelines.unclip.prior_init (see dalle_init)
        x, t = batch["image_embedding"][:1], np.zeros((1,), np.int32)
        return model.init(rng, x, t, batch["text_tokens"][:1], batch["text_embedding"][:1],
                          text_mask=batch["text_mask"][:1])  # fmt: skip

    measure_step(size, row, init, prior_loss_fn(model, cfg.diffusion()), batch)
    report_row(row, peer="none")


def gpt_config(size: Size):
    from jaxaigc.models.gpt import GPTConfig

    name, changes = size.gpt
    return name, GPTConfig.from_name(name, **changes, dtype=compute_dtype())


def part_gpt_ppo(size: Size) -> None:
    """One PPO minibatch update of InstructGPT's policy and value networks (clipped surrogate and
    value losses, AdamW) on a batch of rollouts."""
    from jaxaigc.models.gpt import GPT
    from jaxaigc.objectives.ppo import PPOConfig, ppo_loss_fn

    name, policy_config = gpt_config(size)
    b, p, r, row = size.ppo_batch, size.prompt, size.response, "GPT PPO update"
    report_row(row, shape=f"{name} policy + value, batch {b} x ({p} + {r}) tokens, "
               f"{policy_config.dtype}")  # fmt: skip
    policy, value = GPT(policy_config), GPT(policy_config.replace(head="scalar"))
    example = jnp.zeros((1, 8), jnp.int32)

    def init(rng):
        policy_rng, value_rng = jax.random.split(rng)
        return {
            "params": {
                "policy": policy.init(policy_rng, example)["params"],
                "value": value.init(value_rng, example)["params"],
            }
        }

    rng = np.random.default_rng(0)
    batch = {
        "tokens": rng.integers(1, policy_config.vocab_size, (b, p + r)).astype(np.int32),
        "valid": np.ones((b, p + r), bool),
        "mask": np.ones((b, r), bool),
        "old_logprobs": -rng.uniform(0, 5, (b, r)).astype(np.float32),
        "old_values": rng.normal(size=(b, r)).astype(np.float32),
        "advantages": rng.normal(size=(b, r)).astype(np.float32),
        "returns": rng.normal(size=(b, r)).astype(np.float32),
    }
    loss_fn = ppo_loss_fn(policy, value, PPOConfig(response_length=r))
    measure_step(size, row, init, loss_fn, batch)
    report_row(row, peer="none")


def part_gpt_rollout(size: Size) -> None:
    """The policy's KV-cache rollout (prefill, then every token drawn greedily) against
    ``transformers``' GPT-2 ``generate`` with the same weights, batch and lengths."""
    from jaxaigc.convert import gpt2_from_torch
    from jaxaigc.sample.decode import generate

    name, config = gpt_config(size)
    b, p, r, row = size.rollout_batch, size.prompt, size.response, "GPT KV-cache rollout"
    report_row(row, shape=f"{name}, batch {b}, prompt {p}, {r} tokens drawn, {config.dtype}",
               tokens=b * r)  # fmt: skip
    prompt = np.random.default_rng(0).integers(0, config.vocab_size, (b, p)).astype(np.int32)
    try:
        torch, device, sync, autocast = torch_peer("transformers")
    except NoPeer as error:
        no_peer = f"transformers GPT-2 generate: {error}"
        from jaxaigc.models.gpt import GPT

        variables = jax.jit(GPT(config).init)(jax.random.key(0), prompt[:1])
        variables = nn.meta.unbox(variables)
    else:
        no_peer = None
        import transformers

        reference = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=config.vocab_size, n_positions=config.context_length,
                n_embd=config.width, n_layer=config.layers, n_head=config.heads,
            )
        ).eval()  # fmt: skip
        converted, variables = gpt2_from_torch(reference.state_dict(), config.heads)
        config = converted.replace(dtype=config.dtype)
        reference.to(device)
    params, prompt = jax.device_put((variables["params"], prompt))

    def rollout(params, prompt):
        return generate(config, params, prompt, steps=r, rng=jax.random.key(0), temperature=0.0)

    measure(size, row, rollout, (params, prompt), params)
    if no_peer:
        report_row(row, peer=no_peer)
        return
    ids = torch.from_numpy(np.array(prompt)).long().to(device)

    def torch_generate():
        def call():
            with torch.no_grad(), autocast():
                reference.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=r, min_new_tokens=r,
                    do_sample=False, pad_token_id=0,
                )  # fmt: skip
            sync()

        return call

    time_peer(size, row, "transformers GPT-2 generate", torch_generate)


PARTS: dict[str, Callable[[Size], None]] = {
    "ceiling": part_ceiling,
    "clip-vit-b16": functools.partial(part_clip, label="ViT-B/16"),
    "clip-rn50": functools.partial(part_clip, label="RN50"),
    "dalle-step": part_dalle_step,
    "dalle-sample": part_dalle_sample,
    "dalle-layer": part_dalle_layer,
    "unclip-decoder": part_unclip_decoder,
    "unclip-prior": part_unclip_prior,
    "gpt-ppo": part_gpt_ppo,
    "gpt-rollout": part_gpt_rollout,
}
# Parts whose process holds a PyTorch peer beside JAX on the accelerator: JAX preallocates less.
WITH_PEER = {"clip-vit-b16", "clip-rn50", "dalle-layer", "unclip-decoder", "gpt-rollout"}


def parse_timeouts(text: str, parts: list[str]) -> dict[str, float]:
    """``"120,clip-rn50=240"`` -> each part's limit in seconds (the bare number for the rest)."""
    default, limits = None, {}
    for item in text.split(","):
        name, _, seconds = item.rpartition("=")
        try:
            value = float(seconds)
        except ValueError:
            raise SystemExit(f"--part-timeout: {item!r} is not SECONDS or PART=SECONDS") from None
        if value <= 0:
            raise SystemExit(f"--part-timeout: {item!r} must be positive")
        if not name:
            default = value
        elif name not in PARTS:
            raise SystemExit(f"--part-timeout: unknown part {name!r}; known: {', '.join(PARTS)}")
        else:
            limits[name] = value
    if default is None and set(parts) - set(limits):
        missing = ", ".join(sorted(set(parts) - set(limits)))
        raise SystemExit(f"--part-timeout: no limit for {missing}; give a bare number for them")
    return {part: limits.get(part, default) for part in parts}


def main() -> None:
    description = __doc__.splitlines()[0]
    parser = argparse.ArgumentParser(prog="jaxaigc bench suite", description=description)
    names = [name for name in PARTS if name != "ceiling"]
    parser.add_argument("--parts", default=",".join(names), help="comma-separated, in order")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument(
        "--part-timeout", default="300", help="seconds per part: 300, or 120,clip-rn50=240"
    )
    parser.add_argument("--out", default="runs/bench", help="folder for suite.jsonl, .md, .log")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child: run this part, print its rows
    args = parser.parse_args()
    size = SIZES[args.size]
    if args.one:
        PARTS[args.one](size)
        return

    parts = args.parts.split(",")
    unknown = [p for p in parts if p not in PARTS or p == "ceiling"]
    if unknown:
        raise SystemExit(f"--parts: unknown {unknown}; known: {', '.join(names)}")
    timeouts = parse_timeouts(args.part_timeout, ["ceiling", *parts])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "suite.log"
    log.write_text("")
    command = "jaxaigc bench suite " + shlex.join(sys.argv[1:])

    def run(part: str):
        env = dict(os.environ)
        # JAX takes 75% of an accelerator's memory at start-up; leave the rest to PyTorch.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45" if part in WITH_PEER else "0.9")
        child = [sys.executable, __file__, "--one", part, "--size", args.size]
        result = run_part(child, timeouts[part], log, env)
        print(f"{part}: {result.status} ({result.seconds:.0f} s)", flush=True)
        return result

    ceiling_result = run("ceiling")
    fields = ceiling_result.rows.get("matmul ceiling", {})
    ceiling = fields["flops"] / fields["seconds"] if "seconds" in fields else None
    device_kind = fields.get("device_kind", "unknown (the ceiling part did not finish)")
    header = {
        "device": fields.get("device", device_kind), **environment(command), "size": args.size,
        "part limits (s)": ", ".join(f"{p} {s:g}" for p, s in timeouts.items()),
    }  # fmt: skip
    if ceiling:
        header["predicted ms"] = predicted_seconds(ceiling, device_kind, ceiling)[1]
    table = SuiteTable(out, header)
    table.add("ceiling", ceiling_result, ceiling, device_kind)
    for part in parts:
        table.add(part, run(part), ceiling, device_kind)
    print(table.markdown.read_text())


if __name__ == "__main__":
    main()
