"""``jaxaigc plan``: the step ``jaxaigc train`` runs, compiled for a mesh of N devices on abstract
inputs (no parameter is allocated), with its FLOPs, its per-device memory, whether it fits a
chip's HBM, and the step time the chip's peak would give at 40% MFU.

The step is built by the recipe's own ``make_task`` and :func:`jaxaigc.train.loop.step_function`,
jitted by ``jit_train_step`` as training jits it. The N devices are emulated CPU devices, so any
host plans any pod; XLA:CPU assigns buffers like the accelerator backends but fuses differently:
its memory figures are an order of magnitude for a TPU or GPU, not a promise.

FLOPs are counted in the compiled per-device program: every dot and convolution, each loop body
times its trip count (XLA's ``known_trip_count``). XLA's own cost analysis counts a loop body
once, so a scanned model or the PPO rollout would read as a fraction of its work.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxaigc import parallel
from jaxaigc.compile_options import jit_inference
from jaxaigc.configs import fields
from jaxaigc.configs.pod import full_size, pod_mesh
from jaxaigc.train import loop, sizing
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step

GIB = 2**30
MFU = 0.4  # the step time is quoted at this fraction of the chip's peak


@dataclasses.dataclass(frozen=True)
class Chip:
    """An accelerator: its memory and its dense bf16 peak (the vendors' figures)."""

    name: str
    hbm_bytes: float
    peak_flops: float


# Memory as the chip exposes it (TPU: the spec; GPU: nvidia-smi's total), peak dense bf16
# FLOP/s per chip (TPU: one chip, both cores of v4 / v5p; GPU: SXM, without sparsity).
CHIPS = {
    "tpu-v4": Chip("TPU v4", 32 * GIB, 275e12),
    "tpu-v5e": Chip("TPU v5e", 16 * GIB, 197e12),
    "tpu-v5p": Chip("TPU v5p", 95 * GIB, 459e12),
    "tpu-v6e": Chip("TPU v6e", 32 * GIB, 918e12),
    "h100": Chip("NVIDIA H100 SXM", 81_559 * 2**20, 989e12),
    "h200": Chip("NVIDIA H200 SXM", 143_771 * 2**20, 989e12),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """What ``plan`` sizes: a recipe's step, optionally with a full-size preset's model."""

    recipe: str  # a recipe of jaxaigc.run.RECIPES
    step: str  # the recipe's step: "train", or unCLIP's "prior" / "decoder", InstructGPT's "ppo"
    preset: str | None = None  # the model preset; None keeps the recipe's model
    batch: int | None = None  # the paper's global batch (None: the recipe's)
    system: str = ""  # lm, clip, dvae, dalle, unclip or instructgpt; "": the recipe's name

    def __post_init__(self):
        if not self.system:
            object.__setattr__(self, "system", self.recipe)


def _presets() -> dict[str, Target]:
    from jaxaigc.models import clip, gpt

    out = {}
    for name in clip.PRESETS:
        if not name.startswith("tiny"):
            out[name] = Target("clip", "train", name, 32_768)  # Radford et al. 2021, 2.5
    out["paper-12b"] = Target("dalle", "train", "paper-12b", 1024)  # Ramesh et al. 2021, B.2
    out["paper-1b"] = Target("unclip", "prior", "paper-1b", 4096)  # Ramesh et al. 2022, C
    out["paper-3.5b"] = Target("unclip", "decoder", "paper-3.5b", 2048)
    # Karlo's released prior and 64 px decoder; Kakao Brain published no batch sizes: the paper's.
    out["karlo-prior"] = Target("unclip", "prior", "karlo-prior", 4096)
    out["karlo-decoder"] = Target("unclip", "decoder", "karlo-decoder", 2048)
    for name in gpt.PRESETS:
        if name != "gpt3-175b":  # InstructGPT's PPO batch: 512 prompts (Ouyang et al., C.4)
            out[name] = Target("instructgpt", "ppo", name, 512)
    return out


TARGETS: dict[str, Target] = {
    "lm": Target("lm", "train"),
    "clip": Target("clip", "train"),
    "dvae": Target("dvae", "train"),
    "dalle": Target("dalle", "train"),
    "unclip.prior": Target("unclip", "prior"),
    "unclip.decoder": Target("unclip", "decoder"),
    "instructgpt": Target("instructgpt", "ppo"),
    **_presets(),
    # The full-size recipes on your data (configs/pod), as they launch.
    "clip-vit-b32": Target("clip-vit-b32", "train", system="clip"),
    "clip-vit-b16": Target("clip-vit-b16", "train", system="clip"),
    "siglip-vit-b16": Target("siglip-vit-b16", "train", system="clip"),
    "dalle-12b": Target("dalle-12b", "train", system="dalle"),
    "unclip-prior-1b": Target("unclip-prior-1b", "prior", system="unclip"),
    "unclip-decoder-3.5b": Target("unclip-decoder-3.5b", "decoder", system="unclip"),
    "instructgpt-gpt2": Target("instructgpt-gpt2", "ppo", system="instructgpt"),
}


def recipe_step(target: Target) -> tuple[ml_collections.ConfigDict, Any, dict, int]:
    """``(config, task, batch_spec, tokens_per_example)`` of ``target``: the training config
    the step runs with (its ``train``, ``optim`` and ``mesh`` sections), the recipe's task and
    one example's ``{name: (shape, dtype)}``."""
    from jaxaigc import run
    from jaxaigc.models.clip import CLIPConfig
    from jaxaigc.models.dalle import DALLEConfig
    from jaxaigc.models.decoder import DecoderConfig
    from jaxaigc.models.gpt import GPTConfig
    from jaxaigc.models.prior import PriorConfig
    from jaxaigc.systems import clip, dalle, dvae, instructgpt, lm, unclip

    config = run.get_config(target.recipe, quick=False)
    if target.recipe != target.system:  # a full-size recipe: its own model, batch and mesh
        return _full_size_step(target, config)
    if target.recipe == "lm":
        _, task = lm.make_task(config)
        return config, task, lm.batch_spec(config), config.model.context_length
    if target.recipe == "clip":
        if target.preset:
            config.model = full_size(CLIPConfig, target.preset)
            config.data.text_pairs = 0
            pod_mesh(config)
        _, task = clip.make_task(config)
        return config, task, clip.batch_spec(config), 0
    if target.recipe == "dvae":
        _, task = dvae.make_task(config)
        return config, task, dvae.batch_spec(config), 0
    if target.recipe == "dalle":
        if target.preset:
            config.model = full_size(DALLEConfig, target.preset)
            pod_mesh(config)
        model, task = dalle.make_task(config)
        spec = dalle.batch_spec(config)
        return config, task, spec, model.config.text_len + model.config.image_len
    if target.recipe == "unclip":
        clip_model = run.get_config("clip").model
        stage = config[target.step]
        if target.step == "prior":
            if target.preset:
                stage.model = full_size(PriorConfig, target.preset)
            else:
                stage.model.update(
                    embed_dim=clip_model.embed_dim, text_width=clip_model.transformer_width
                )
            make, spec_of = unclip.make_prior_task, unclip.prior_batch_spec
        else:
            if target.preset:
                stage.model = full_size(DecoderConfig, target.preset)
            else:
                stage.model.update(
                    clip_dim=clip_model.embed_dim, image_size=clip_model.image_resolution
                )
            make, spec_of = unclip.make_decoder_task, unclip.decoder_batch_spec
        if target.preset:
            pod_mesh(stage)
        _, task = make(config)
        return stage, task, spec_of(config), 0
    # InstructGPT: one PPO iteration (rollout, scoring, GAE, minibatch updates).
    if target.preset:
        config.model = full_size(GPTConfig, target.preset)
        context = config.model.context_length
        config.data.prompt_length = context // 4  # prompt + response fit the context
        config.ppo.algorithm.update(
            response_length=context // 4, eos_id=50256, pad_id=50256, minibatches=8
        )
        pod_mesh(config)
    stage_config = instructgpt.ppo_stage_config(config, "ppo_ptx")
    task = instructgpt.ppo_task(stage_config)
    tokens = config.data.prompt_length + config.ppo.algorithm.response_length
    return stage_config, task, instructgpt.ppo_batch_spec(config), tokens


def _full_size_step(
    target: Target, config: ml_collections.ConfigDict
) -> tuple[ml_collections.ConfigDict, Any, dict, int]:
    """:func:`recipe_step` of a full-size recipe (``jaxaigc.configs.pod``); frozen models
    (a dVAE, a CLIP text tower, the SFT reference) are randomly initialised, as abstract as the
    rest."""
    from jaxaigc.systems import clip, dalle_pod, instructgpt_pod, unclip_pod

    if target.system == "clip":
        _, task = clip.make_task(config)
        return config, task, clip.batch_spec(config), 0
    if target.system == "dalle":  # the frozen dVAE encoder tokenises the images in the step
        model, task = dalle_pod.make_task(config)
        tokens = model.config.text_len + model.config.image_len
        return config, task, dalle_pod.batch_spec(config), tokens
    if target.step == "prior":  # the frozen CLIP text tower encodes the captions in the step
        _, task = unclip_pod.make_prior_task(config)
        return config, task, unclip_pod.prior_batch_spec(config), 0
    if target.step == "decoder":
        _, task = unclip_pod.make_decoder_task(config)
        return config, task, unclip_pod.decoder_batch_spec(config), 0
    if target.step == "ppo":  # PPO-ptx: policy, value, frozen SFT reference and reward model
        stage = instructgpt_pod.stage_config(config, "ppo_ptx")
        tokens = config.data.prompt_length + config.ppo.algorithm.response_length
        spec = instructgpt_pod.ppo_batch_spec(config)
        return stage, instructgpt_pod.ppo_task(stage), spec, tokens
    raise ValueError(f"no step known for the full-size recipe {target.recipe!r}")


# --- FLOPs of a compiled program ---------------------------------------------------------

_SHAPE = re.compile(r"^(?:\(|)([a-z]+\d*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+.*\{\s*$")


def _dims(text: str) -> list[int] | None:
    match = _SHAPE.match(text.strip())
    if not match:
        return None
    return [int(d) for d in match.group(2).split(",") if d]


def hlo_flops(hlo_text: str) -> float:
    """Multiply-add FLOPs (2 per MAC) of every ``dot`` and ``convolution`` in an HLO module's
    text, each computation counted as often as it runs: loop bodies times XLA's
    ``known_trip_count``, fusions and calls once per call site."""
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and not line[0].isspace():
                current = match.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    def own_flops_and_calls(lines: list[str]) -> tuple[float, list[tuple[str, float]]]:
        shapes: dict[str, list[int]] = {}
        flops, calls = 0.0, []
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            name, shape, op, rest = match.groups()
            dims = _dims(shape)
            if dims is not None:
                shapes[name] = dims
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            if op == "dot" and dims is not None:
                lhs = shapes.get(operands[0]) if operands else None
                contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
                if lhs is not None and contracting:
                    k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
                    flops += 2.0 * math.prod(dims) * k
            elif op == "convolution" and dims is not None and len(operands) >= 2:
                kernel = shapes.get(operands[1])
                labels = re.search(r"dim_labels=\w+_(\w+)->", rest)
                if kernel is not None and labels:
                    # Per output element: the kernel's window times its input features (already
                    # per group in a grouped convolution).
                    per_output = math.prod(kernel) / kernel[labels.group(1).index("o")]
                    flops += 2.0 * math.prod(dims) * per_output
            trips = 1.0
            if op == "while":
                count = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                trips = float(count.group(1)) if count else 1.0
            for key in ("body", "calls", "to_apply", "branch_computations"):
                for callee in re.findall(rf"{key}=\{{?([%\w.\-, ]+)\}}?", rest):
                    for target in callee.split(","):
                        target = target.strip().lstrip("%")
                        if target in computations and key != "to_apply":
                            calls.append((target, trips if key == "body" else 1.0))
        return flops, calls

    parsed = {name: own_flops_and_calls(lines) for name, lines in computations.items()}
    memo: dict[str, float] = {}

    def total(name: str) -> float:
        if name not in memo:
            own, calls = parsed[name]
            memo[name] = own + sum(times * total(callee) for callee, times in calls)
        return memo[name]

    return total(entry)


# --- The plan --------------------------------------------------------------------------


def parse_mesh(text: str, devices: int) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` over ``devices`` -> every axis's size (missing axes 1, one -1 takes
    the remaining devices)."""
    return parallel.parse_mesh_spec(sizing.parse_mesh(text), devices)


@dataclasses.dataclass
class Prepared:
    """A checked plan request: the step's config, task and batch spec, and the mesh's sizes."""

    name: str
    target: Target
    config: ml_collections.ConfigDict
    task: Any
    spec: dict
    tokens: int
    sizes: dict[str, int]
    chip: str | None
    sample: bool = False


def prepare(
    name: str,
    *,
    devices: int,
    mesh: str | None = None,
    batch: int | None = None,
    accum: int | None = None,
    chip: str | None = None,
    sample: bool = False,
) -> Prepared:
    """Checks a plan request and builds its step's config and task (nothing is traced, the
    backend is not started); bad input raises ``ValueError`` naming it."""
    if name not in TARGETS:
        raise ValueError(f"unknown recipe or preset {name!r}; known: {', '.join(TARGETS)}")
    if chip is not None and chip not in CHIPS:
        raise ValueError(f"unknown chip {chip!r}; known: {', '.join(CHIPS)}")
    target = TARGETS[name]
    if sample and target.system in ("clip", "dvae"):
        raise ValueError(f"{name} has no sampler; --sample plans GPT, DALL-E, prior and decoder")
    config, task, spec, tokens = recipe_step(target)
    if mesh:
        sizes = parse_mesh(mesh, devices)
    else:
        sizes = parallel.parse_mesh_spec(config.mesh.shape.to_dict(), devices)
    global_batch = batch or target.batch or config.train.batch_size
    accum = accum or config.train.accum_steps
    if task.make_step is not None and accum != 1:
        raise ValueError(f"the {target.recipe} {target.step} step takes no accumulation: accum 1")
    data_parallel = sizes["data"] * sizes["fsdp"]
    if global_batch % (data_parallel * accum):
        raise ValueError(
            f"batch {global_batch} does not divide into {accum} microbatches over the "
            f"{data_parallel} data-parallel devices (data={sizes['data']} x fsdp={sizes['fsdp']})"
        )
    config.train.batch_size, config.train.accum_steps = global_batch, accum
    return Prepared(name, target, config, task, spec, tokens, sizes, chip, sample)


def plan(name: str, *, devices: int, device_list: Sequence[Any] | None = None, **request):
    """Compiles ``name``'s training step (a recipe of :data:`TARGETS` or a preset) for a mesh
    of ``devices`` (the first of ``device_list``, default ``jax.devices()``) and returns its
    figures (see :func:`format_plan`); ``request``: :func:`prepare`'s mesh, batch, accum,
    chip."""
    return compile_plan(prepare(name, devices=devices, **request), device_list)


def compile_plan(prepared: Prepared, device_list: Sequence[Any] | None = None) -> dict[str, Any]:
    """:func:`plan` of a :func:`prepare`d request."""
    p, config, task = prepared, prepared.config, prepared.task
    devices = math.prod(p.sizes.values())
    available = list(device_list if device_list is not None else jax.devices())
    if len(available) < devices:
        raise ValueError(f"{devices} devices asked for; this process has {len(available)}")
    jax_mesh = parallel.make_mesh(p.sizes, devices=available[:devices])
    rules = parallel.make_rules(config.mesh.rules.to_dict())
    global_batch = config.train.batch_size
    if p.sample:
        return _compile_sampler(p, jax_mesh, rules)
    tx, schedule = loop.optimizer(task, config)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    step = loop.step_function(task, config, tx, schedule, step_rng)
    _, shardings, state = create_sharded_state(
        task.init,
        tx,
        init_rng,
        jax_mesh,
        rules,
        use_ema=config.train.ema_decay > 0,
        materialize=False,
    )
    abstract = sizing.abstract_batch(p.spec, global_batch, jax_mesh)
    compiled = jit_train_step(step, jax_mesh, rules, shardings, abstract).lower(state, abstract)
    compiled = compiled.compile()
    return _figures(p, compiled, state.params, jax.tree.leaves(state), p.tokens)


def _figures(p: Prepared, compiled, params, state_leaves, tokens: int) -> dict[str, Any]:
    """The figures of a compiled program: parameters, FLOPs, memory, fit."""
    devices, global_batch = math.prod(p.sizes.values()), p.config.train.batch_size
    figures = sizing.compiled_figures(compiled)
    flops = hlo_flops(compiled.as_text()) * devices
    params = jax.tree.leaves(params)
    result = dict(
        name=p.name,
        recipe=p.target.recipe,
        step=p.target.step,
        devices=devices,
        mesh=p.sizes,
        batch=global_batch,
        accum=p.config.train.accum_steps,
        sampler=_sampler_name(p) if p.sample else None,
        params=sum(math.prod(x.shape) for x in params),
        state_bytes_per_device=sum(
            math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
            for x in state_leaves
            if hasattr(x, "sharding")
        ),
        flops=flops,
        flops_per_example=flops / global_batch,
        flops_per_token=flops / (global_batch * tokens) if tokens else None,
        xla_cost_analysis_flops=figures["flops"] * devices,
        argument=figures["argument"],
        output=figures["output"],
        alias=figures["alias"],
        temp=figures["temp"],
        peak=figures["peak"],
    )
    if p.chip is not None:
        result.update(fit(result, CHIPS[p.chip]))
    return result


# The recipes' samplers as the demo runs them: the paper's prior (64 DDIM steps, best of 2) and
# the decoder's DDIM 25 at guidance 3 (configs/unclip.py).
PRIOR_SAMPLING = dict(steps=64, candidates=2)
DECODER_SAMPLING = dict(steps=25, guidance_scale=3.0, method="ddim")


def _sampler(p: Prepared) -> tuple[Any, dict, Any, int]:
    """``(init, inputs, sample, tokens)``: the sampling model's ``init(rng)``, one example's
    inputs ``{name: (shape, dtype)}``, ``sample(params, *inputs)`` and the tokens it draws per
    example (0 for images)."""
    from jaxaigc.models.dalle import DALLE, DALLEConfig
    from jaxaigc.models.decoder import Decoder, DecoderConfig
    from jaxaigc.models.gpt import GPT, GPTConfig
    from jaxaigc.models.prior import Prior, PriorConfig
    from jaxaigc.pipelines import dalle as dalle_pipeline
    from jaxaigc.pipelines import unclip as unclip_pipeline
    from jaxaigc.sample import decode
    from jaxaigc.sample import diffusion as diffusion_sampling

    config, recipe, key = p.config, p.target.system, jax.random.key(0)
    if recipe in ("lm", "instructgpt"):
        model_config = fields.to_dataclass(GPTConfig, config.model)
        context = model_config.context_length
        if recipe == "lm":
            prompt_length = steps = context // 2
        else:
            prompt_length, steps = config.data.prompt_length, config.ppo.algorithm.response_length
        model = GPT(model_config)

        def init(rng):
            return model.init(rng, jnp.zeros((1, context), jnp.int32))

        def sample(params, prompt, valid):
            return decode.generate(model_config, params, prompt, steps=steps, rng=key, valid=valid)

        inputs = {"prompt": ((prompt_length,), jnp.int32), "valid": ((prompt_length,), bool)}
        return init, inputs, sample, steps
    if recipe == "dalle":
        model_config = fields.to_dataclass(DALLEConfig, config.model)

        def sample(params, text):
            return decode.sample_image_tokens(model_config, params, text, rng=key)

        inputs = {"text": ((model_config.text_len,), jnp.int32)}
        return dalle_pipeline.init_fn(DALLE(model_config)), inputs, sample, model_config.image_len
    if p.target.step == "prior":
        model = Prior(fields.to_dataclass(PriorConfig, config.model))
        cfg = model.config

        def sample(params, text_tokens, text_embedding, text_mask):
            return diffusion_sampling.sample_prior(
                model, params, cfg.diffusion(), text_tokens, text_embedding, key,
                text_mask=text_mask, **PRIOR_SAMPLING,
            )  # fmt: skip

        inputs = {
            "text_tokens": ((cfg.text_len, cfg.text_width), jnp.float32),
            "text_embedding": ((cfg.embed_dim,), jnp.float32),
            "text_mask": ((cfg.text_len,), bool),
        }
        return unclip_pipeline.prior_init(model), inputs, sample, 0
    model = Decoder(fields.to_dataclass(DecoderConfig, config.model))
    cfg = model.config
    inputs = {"image_embedding": ((cfg.clip_dim,), jnp.float32)}
    if cfg.text_layers:
        inputs["text"] = ((cfg.text_len,), jnp.int32)

    def sample(params, image_embedding, text=None):
        return diffusion_sampling.sample_decoder(
            model, params, cfg.diffusion(), image_embedding, key, text=text, **DECODER_SAMPLING
        )

    return unclip_pipeline.decoder_init(model), inputs, sample, 0


def _sampler_name(p: Prepared) -> str:
    if p.target.system in ("lm", "instructgpt"):
        return "KV-cache decoding, every token drawn"
    if p.target.system == "dalle":
        return "KV-cache decoding of the image tokens"
    if p.target.step == "prior":
        return "DDIM {steps} steps, best of {candidates}".format(**PRIOR_SAMPLING)
    return "DDIM {steps} steps at guidance {guidance_scale}".format(**DECODER_SAMPLING)


def _compile_sampler(p: Prepared, jax_mesh, rules) -> dict[str, Any]:
    """Compiles the recipe's sampler (KV-cache decoding, the DDIM loops) for the global batch
    on abstract parameters sharded as training shards them, jitted as inference is."""
    init, inputs, sample, tokens = _sampler(p)
    _, _, state = create_sharded_state(
        init, optax.identity(), jax.random.key(0), jax_mesh, rules, materialize=False
    )
    abstract = sizing.abstract_batch(inputs, p.config.train.batch_size, jax_mesh)

    def with_rules(params, *args):
        with nn.logical_axis_rules(rules):
            return sample(params, *args)

    with jax.set_mesh(jax_mesh):
        lowered = jit_inference(with_rules).lower(state.params, *abstract.values())
    return _figures(p, lowered.compile(), state.params, jax.tree.leaves(state.params), tokens)


def fit(result: Mapping[str, Any], chip: Chip) -> dict[str, Any]:
    """Whether ``result``'s step fits ``chip``, the smallest fsdp mesh estimated to fit the same
    global batch, and the step time at :data:`MFU` of the chip's peak.

    The estimate spreads the measured peak over more devices: the sharded state (parameters,
    optimiser moments) over fsdp, the rest (batch, activations) over the data-parallel devices,
    whose per-device batch shrinks with them; re-plan with that ``--mesh`` to check it."""
    sizes = result["mesh"]
    state = result["state_bytes_per_device"] * sizes["fsdp"]
    rest = (result["peak"] - result["state_bytes_per_device"]) * sizes["data"] * sizes["fsdp"]
    smallest = next(
        (
            size
            for size in (2**i for i in range(15))
            if size <= result["batch"] and (state + rest) / size <= chip.hbm_bytes
        ),
        None,
    )
    return dict(
        chip=chip.name,
        hbm=chip.hbm_bytes,
        fits=result["peak"] <= chip.hbm_bytes,
        smallest_fsdp=smallest,
        step_seconds_at_mfu=result["flops"] / (result["devices"] * chip.peak_flops * MFU),
    )


def _bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def format_plan(result: Mapping[str, Any]) -> str:
    """The figures of :func:`plan` as the lines ``jaxaigc plan`` prints."""
    r = result
    mesh = " x ".join(f"{axis} {size}" for axis, size in r["mesh"].items())
    per_token = f", per token {r['flops_per_token']:.3e}" if r["flops_per_token"] else ""
    what = f"sampler ({r['sampler']})" if r["sampler"] else f"{r['step']} step"
    lines = [
        f"{r['name']}: the {r['recipe']} {what} on {r['devices']} devices ({mesh}), "
        f"global batch {r['batch']:,}"
        + ("" if r["sampler"] else f" in {r['accum']} microbatch(es)"),
        f"  parameters          {r['params'] / 1e6:,.1f}M",
        f"  FLOPs per {'call' if r['sampler'] else 'step'}      {r['flops']:.3e} (per example "
        f"{r['flops_per_example']:.3e}"
        f"{per_token}; XLA's cost analysis, loops once: {r['xla_cost_analysis_flops']:.3e})",
        f"  memory per device   arguments {_bytes(r['argument'])}, outputs {_bytes(r['output'])}"
        f" (aliased {_bytes(r['alias'])}), temporaries {_bytes(r['temp'])}, peak "
        f"{_bytes(r['peak'])} (XLA:CPU's buffer assignment)",
    ]
    if "chip" in r:
        smallest = r["smallest_fsdp"]
        lines += [
            f"  {r['chip']}: {r['hbm'] / GIB:.0f} GiB HBM -> "
            + ("fits" if r["fits"] else "does not fit")
            + (
                f"; the same batch on fsdp={smallest} (data=1) is estimated to fit"
                if smallest
                else "; no fsdp size up to 16,384 is estimated to fit"
            ),
            f"  step time at {MFU:.0%} MFU: {r['step_seconds_at_mfu'] * 1e3:.3g} ms",
        ]
    return "\n".join(lines)


def chip_table() -> str:
    """The chips ``plan`` knows, as a markdown table."""
    rows = ["| chip | name | HBM GiB | peak bf16 TFLOP/s |", "|---|---|---|---|"]
    rows += [
        f"| {key} | {c.name} | {c.hbm_bytes / GIB:.1f} | {c.peak_flops / 1e12:.0f} |"
        for key, c in CHIPS.items()
    ]
    return "\n".join(rows)
