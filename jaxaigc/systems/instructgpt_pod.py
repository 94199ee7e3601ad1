"""InstructGPT (Ouyang et al. 2022) on your own JSONL data, starting from a converted GPT-2: SFT on
the demonstrations -> a reward model on the comparisons -> PPO and PPO-ptx on the prompts.

``config.stages.base`` is a run written by ``jaxaigc convert gpt2``: the policy's initial weights
and its tokenizer. The architecture (vocabulary, context, width, depth, heads) is the base's;
``config.model`` keeps how it computes (dtype, scanned blocks, remat). Text is GPT-2's BPE: a
sequence is the prompt's ids, the response's, then EOS (the rows:
:mod:`jaxaigc.data.preference_tokens`).

Each stage is a :func:`jaxaigc.train.loop.train` run in its directory of ``config.stages``
(checkpointed, resumable) from the previous stage's parameters: sft from the base; rm from sft,
a scalar head in place of the unembedding, then normalised on the SFT policy's samples (Ziegler
et al.; or centred on demonstrations, the paper's section 3.5); ppo and ppo_ptx from sft and the
normalised rm (:mod:`jaxaigc.train.ppo`). Every file is read and every size checked
before anything compiles. The evaluation: :mod:`jaxaigc.evaluate.instructgpt_pod`.
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxaigc.configs import fields
from jaxaigc.configs.saved import load_run
from jaxaigc.configs.stages import stage_dir
from jaxaigc.data import preferences
from jaxaigc.data.pipeline import ArrayRecords, BatchIterator
from jaxaigc.data.preference_tokens import Encoder
from jaxaigc.data.tokenizers import Gpt2Tokenizer
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.ppo import PPOConfig, fit_reward_normalizer
from jaxaigc.objectives.reward import (
    center_rewards,
    last_index,
    normalize_rewards,
    reward_loss_fn,
    sequence_scores,
)
from jaxaigc.objectives.sft import sft_loss_fn
from jaxaigc.train import checkpoint, loop
from jaxaigc.train.ppo import load_params, make_ppo_task, saved_score_head
from jaxaigc.train.rollout import score_samples

PPO_STAGES = ("ppo", "ppo_ptx")
NORMALIZE_ON = ("sft_samples", "demonstrations")  # config.rm.normalize_on
NORMALIZER = "reward_normalizer.json"  # the normalised score head, in the rm run
# The fields of config.model the base's weights fix.
ARCHITECTURE = ("vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio",
                "activation", "ln_eps", "tie_embeddings")  # fmt: skip
REQUIRED_DATA = {
    "demonstrations": '/data/sft/*.jsonl, lines {"prompt": ..., "response": ...}',
    "comparisons": '/data/hh-rlhf/train.jsonl, lines {"chosen": ..., "rejected": ...}',
    "prompts": '/data/rl/*.jsonl, lines {"prompt": ...}',
}


def base_dir(config: ml_collections.ConfigDict, workdir: str | Path) -> Path:
    """The converted GPT-2 run of ``config.stages.base``."""
    if not config.stages.base:
        raise ValueError(
            "config.stages.base is empty: set it to a converted GPT-2 run, e.g. "
            "--config.stages.base=/runs/gpt2-xl after `jaxaigc convert gpt2 "
            "gpt2-xl/model.safetensors /runs/gpt2-xl`"
        )
    path = stage_dir(config, workdir, "base")
    recipe, _ = load_run(path)
    if recipe != "gpt2":
        raise ValueError(f"config.stages.base {path} holds a {recipe!r} run, not a GPT-2")
    return path


def resolve(
    config: ml_collections.ConfigDict, workdir: str | Path
) -> tuple[ml_collections.ConfigDict, Gpt2Tokenizer]:
    """``config`` with the base's architecture in ``model`` and its tokenizer's EOS and pad ids in
    ``ppo.algorithm``, and the tokenizer; raises ``ValueError`` when the lengths do not fit."""
    base = base_dir(config, workdir)
    _, saved = load_run(base)
    tokenizer = Gpt2Tokenizer.from_folder(base)
    out = ml_collections.ConfigDict(config.to_dict())
    out.model.update({name: saved.model[name] for name in ARCHITECTURE})
    out.ppo.algorithm.update(eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    if tokenizer.vocab_size > out.model.vocab_size:
        raise ValueError(
            f"the tokenizer in {base} has {tokenizer.vocab_size} tokens; the model only "
            f"{out.model.vocab_size}"
        )
    data, context = out.data, out.model.context_length
    response = max(data.response_length, out.ppo.algorithm.response_length)
    if data.prompt_length + response > context:
        raise ValueError(
            f"data.prompt_length {data.prompt_length} + the response length {response} "
            f"(data.response_length, ppo.algorithm.response_length) exceed the base's context "
            f"of {context} tokens"
        )
    return out, tokenizer


def policy_config(config: ml_collections.ConfigDict | dict) -> GPTConfig:
    return fields.to_dataclass(GPTConfig, config["model"])


def ppo_config(config: ml_collections.ConfigDict) -> PPOConfig:
    return fields.to_dataclass(PPOConfig, config.ppo.algorithm)


def reward_config(config: ml_collections.ConfigDict | dict) -> GPTConfig:
    """The reward (and value) model: the policy with a scalar head."""
    return policy_config(config).replace(head="scalar")


def ppo_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return PPO_STAGES if config.plain_ppo else PPO_STAGES[1:]


class Data(NamedTuple):
    """Every record the run reads, split into training and held-out sets."""

    demonstrations: list[preferences.Demonstration]
    comparisons: list[preferences.Comparison]
    eval_comparisons: list[preferences.Comparison]
    prompts: list[str]
    eval_prompts: list[str]
    pretraining: list[str]
    skipped: dict[str, int]  # lines skipped per config.data field


def _read(reader, patterns: str, field: str) -> preferences.JsonlRecords:
    records = reader(patterns)
    shown = f" (first: {records.problems[0]})" if records.skipped else ""
    print(f"data.{field}: {len(records):,} records from {len(records.paths)} files, "
          f"{records.skipped:,} lines skipped{shown}", flush=True)  # fmt: skip
    return records


def read_data(config: ml_collections.ConfigDict) -> Data:
    """Reads every file of ``config.data``, after naming any empty required field."""
    d = config.data
    for field, example in REQUIRED_DATA.items():
        if not d[field]:
            raise ValueError(f"config.data.{field} is empty: set it, e.g. {example}")
    for field in ("comparisons", "prompts"):
        if not (d[f"eval_{field}"] or d.eval_fraction):
            raise ValueError(
                f"no held-out {field} to evaluate on: set config.data.eval_{field} or "
                "config.data.eval_fraction > 0"
            )
    readers = {
        "demonstrations": preferences.Demonstrations,
        "comparisons": preferences.Comparisons,
        "eval_comparisons": preferences.Comparisons,
        "prompts": preferences.Prompts,
        "eval_prompts": preferences.Prompts,
        "pretraining": preferences.Texts,
    }
    read = {field: _read(reader, d[field], field) for field, reader in readers.items() if d[field]}
    for records in (read[f] for f in ("comparisons", "eval_comparisons") if f in read):
        for where, comparison in zip(records.where, records, strict=True):
            if len(comparison.responses) > d.max_k:
                raise ValueError(
                    f"{where}: {len(comparison.responses)} responses; data.max_k is {d.max_k}"
                )

    def split(field: str) -> tuple[list, list]:
        if f"eval_{field}" in read:
            return read[field].records, read[f"eval_{field}"].records
        return preferences.split_held_out(read[field].records, d.eval_fraction, seed=d.seed)

    demonstrations = read["demonstrations"].records
    if "pretraining" in read:
        pretraining = read["pretraining"].records
    else:
        pretraining = [x.prompt + x.response for x in demonstrations]
    return Data(
        demonstrations,
        *split("comparisons"),
        *split("prompts"),
        pretraining,
        skipped={field: records.skipped for field, records in read.items()},
    )


def stage_config(
    config: ml_collections.ConfigDict, stage: str, examples: int = 0
) -> ml_collections.ConfigDict:
    """The config ``stage`` trains with: its section's batch size, steps and learning-rate
    schedule in ``train`` / ``optim``, SFT's dropout, PPO's ``gamma_ptx`` 0. ``examples``: the
    records of an sft or rm epoch (steps = epochs x examples / batch size unless ``steps``)."""
    if stage not in ("sft", "rm", *PPO_STAGES):
        raise ValueError(f"unknown stage {stage!r}; use sft, rm, ppo or ppo_ptx")
    name = "ppo" if stage in PPO_STAGES else stage
    section = config[name]
    if stage in PPO_STAGES:
        steps, what = section.episodes // section.batch_size, "ppo.episodes"
    else:
        steps = section.steps or math.ceil(section.epochs * examples / section.batch_size)
        what = f"{name}.epochs x {examples:,} records"
    if steps < 1:
        raise ValueError(f"{what} make no step of config.{name}.batch_size={section.batch_size}")
    out = ml_collections.ConfigDict(config.to_dict())
    out.train.update(steps=steps, batch_size=section.batch_size)
    for key in ("peak_lr", "warmup_steps", "end_lr_ratio"):
        out.optim[key] = section[key]
    if stage == "sft":
        out.model.dropout_rate = section.dropout_rate
    if stage == "ppo":
        out.ppo.algorithm.gamma_ptx = 0.0
    return out


def encoder(config: ml_collections.ConfigDict, tokenizer: Gpt2Tokenizer) -> Encoder:
    """Token rows for ``config``'s lengths and model (after :func:`resolve`)."""
    d = config.data
    return Encoder(tokenizer, d.prompt_length, d.response_length, config.model.context_length,
                   config.model.vocab_size)  # fmt: skip


def layer_layout(params: Any, *, scan_layers: bool) -> Any:
    """GPT parameters with the blocks stacked (``resblocks``, a scanned model) or one per layer
    (``resblocks_{i}``), as ``scan_layers`` asks; a converted GPT-2 has them one per layer."""
    blocks = params["transformer"]
    if ("resblocks" in blocks) == scan_layers:
        return params
    if scan_layers:
        layers = [blocks[f"resblocks_{i}"] for i in range(len(blocks))]
        blocks = {"resblocks": jax.tree.map(lambda *x: jnp.stack(x), *layers)}
    else:
        depth = len(jax.tree.leaves(blocks["resblocks"])[0])
        blocks = {
            f"resblocks_{i}": jax.tree.map(lambda x, i=i: x[i], blocks["resblocks"])
            for i in range(depth)
        }
    return {**params, "transformer": blocks}


def load_base_params(config: ml_collections.ConfigDict, workdir: str | Path) -> Any:
    """The converted GPT-2's parameters, in the block layout of ``config.model``."""
    base = base_dir(config, workdir)
    _, variables, _, _ = checkpoint.load_model(
        base,
        lambda run_config: GPT(fields.to_dataclass(GPTConfig, run_config["model"])),
        lambda model: lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32)),
        what="GPT-2",
        train_command=f"jaxaigc convert gpt2 model.safetensors {base}",
    )
    return layer_layout(variables["params"], scan_layers=config.model.scan_layers)


def make_sft_task(config, base_params=None) -> tuple[GPT, loop.Task]:
    """SFT (section 3.5): the response tokens' NLL, from the base's parameters (None: a random
    init, to size the step)."""
    model = GPT(policy_config(config))

    def init(rng: jax.Array):
        boxed = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        return {"params": load_params(boxed, base_params, "GPT-2")}

    return model, loop.Task(init=init, loss_fn=sft_loss_fn(model))


def make_rm_task(config, sft_params=None) -> tuple[GPT, loop.Task]:
    """The reward model: the SFT transformer with a fresh scalar head in place of the unembedding
    (None: a random init), trained on Eq. 1 over every pair of a prompt's ranking."""
    model = GPT(reward_config(config))

    def init(rng: jax.Array):
        boxed = model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
        if sft_params is None:
            return {"params": boxed}
        trunk = {k: v for k, v in sft_params.items() if k != "head"}
        trunk["score"] = nn.meta.unbox(boxed)["score"]
        return {"params": load_params(boxed, trunk, "SFT")}

    return model, loop.Task(init=init, loss_fn=reward_loss_fn(model))


def ppo_task(config, sft_params=None, rm_params=None) -> loop.Task:
    """A PPO iteration (:func:`~jaxaigc.train.ppo.make_ppo_task`) from the SFT policy and the
    normalised reward model (None: random inits, to size the step)."""
    return make_ppo_task(
        policy_config(config),
        reward_config(config),
        ppo_config(config),
        policy_params=sft_params,
        reward_params=rm_params,
    )


def sft_batch_spec(config) -> dict:
    """One SFT example's ``{name: (shape, dtype)}`` at its longest."""
    length = config.data.prompt_length + config.data.response_length
    return {"tokens": ((length,), jnp.int32), "response_mask": ((length,), jnp.bool_)}


def rm_batch_spec(config) -> dict:
    """One reward-model example: a prompt's ``max_k`` responses at their longest and ranks."""
    k, length = config.data.max_k, config.data.prompt_length + config.data.response_length
    return {
        "tokens": ((k, length), jnp.int32),
        "response_mask": ((k, length), jnp.bool_),
        "ranks": ((k,), jnp.int32),
    }


def ppo_batch_spec(config) -> dict:
    """One PPO example: a left-padded prompt with its mask, and a pretraining window with its
    target weights (the ptx term)."""
    prompt, context = config.data.prompt_length, config.model.context_length
    return {
        "prompt": ((prompt,), jnp.int32),
        "prompt_valid": ((prompt,), jnp.bool_),
        "ptx": ((context,), jnp.int32),
        "ptx_weights": ((context - 1,), jnp.float32),
    }


def _iterator(arrays: dict[str, np.ndarray], config, stage: str) -> BatchIterator:
    source = ArrayRecords(arrays, name=f"instructgpt-gpt2-{stage}")
    return BatchIterator(source, global_batch_size=config.train.batch_size, seed=config.seed)


def build_sft(config, tokenizer, data: Data, base_params) -> tuple[loop.Task, BatchIterator]:
    _, task = make_sft_task(config, base_params)
    return task, _iterator(
        encoder(config, tokenizer).demonstrations(data.demonstrations), config, "sft"
    )


def build_rm(config, tokenizer, data: Data, sft_params) -> tuple[loop.Task, BatchIterator]:
    _, task = make_rm_task(config, sft_params)
    return task, _iterator(encoder(config, tokenizer).comparisons(data.comparisons), config, "rm")


def build_ppo(
    config, tokenizer, data: Data, sft_params, rm_params
) -> tuple[loop.Task, BatchIterator]:
    encode = encoder(config, tokenizer)
    prompt, valid = encode.prompts(data.prompts)
    arrays = {"prompt": prompt, "prompt_valid": valid}
    arrays |= encode.pretraining(data.pretraining, len(prompt), seed=config.data.seed)
    return ppo_task(config, sft_params, rm_params), _iterator(arrays, config, "ppo")


@functools.cache
def _scorer(model_config: GPTConfig):
    return jax.jit(functools.partial(sequence_scores, GPT(model_config)))


SCORE_BATCH = 64  # sequences per sampling or scoring call


def reward_scores(config, rm_params, tokens, valid, response_mask, *, batch: int = SCORE_BATCH):
    """The reward model's scores [n] of sequences [n, t] at their last response token (EOS)."""
    score = _scorer(reward_config(config))
    return np.concatenate([
        np.asarray(score(rm_params, *(x[i : i + batch] for x in (tokens, valid, response_mask))))
        for i in range(0, len(tokens), batch)
    ])  # fmt: skip


def right_padded_valid(response_mask: np.ndarray) -> np.ndarray:
    """The real tokens of right-padded rows: everything through the last response token."""
    return np.arange(response_mask.shape[-1]) <= np.asarray(last_index(response_mask))[..., None]


def normalized_reward_params(config, tokenizer, rm_params, sft_params, data: Data):
    """The reward model with its score head set as ``config.rm.normalize_on`` says, from the
    first ``rm.normalize_examples`` of its data: ``"sft_samples"``, Ziegler et al.'s gain and
    bias giving mean 0 and standard deviation 1 on the SFT policy's samples of training prompts
    (drawn as the rollouts are), so that beta weighs the KL against a score of unit scale;
    ``"demonstrations"``, the paper's bias alone giving demonstrations mean 0 (section 3.5)."""
    n, encode = config.rm.normalize_examples, encoder(config, tokenizer)
    if config.rm.normalize_on == "demonstrations":
        arrays = encode.demonstrations(data.demonstrations[:n])
        mask = arrays["response_mask"]
        scores = reward_scores(config, rm_params, arrays["tokens"], right_padded_valid(mask), mask)
        return center_rewards(rm_params, jnp.asarray(scores))
    prompt, valid = encode.prompts(data.prompts[:n])
    models = (policy_config(config), reward_config(config), ppo_config(config))
    params = {"policy": sft_params, "reward": rm_params}
    key = jax.random.key(config.seed)
    scores = [
        score_samples(*models, params=params, prompt=prompt[i : i + SCORE_BATCH],
                      prompt_valid=valid[i : i + SCORE_BATCH],
                      rng=jax.random.fold_in(key, i))["raw_score"]
        for i in range(0, len(prompt), SCORE_BATCH)
    ]  # fmt: skip
    return normalize_rewards(rm_params, *fit_reward_normalizer(np.concatenate(scores)))


def _check_sizes(config, data: Data) -> dict[str, ml_collections.ConfigDict]:
    """Each stage's config; raises ``ValueError`` for a data set smaller than its batch or an
    unknown ``rm.normalize_on``."""
    if config.rm.normalize_on not in NORMALIZE_ON:
        raise ValueError(
            f"config.rm.normalize_on={config.rm.normalize_on!r}; use one of {NORMALIZE_ON}"
        )
    counts = {"sft": len(data.demonstrations), "rm": len(data.comparisons)}
    for stage, count, what in (
        ("sft", counts["sft"], "demonstrations"),
        ("rm", counts["rm"], "training comparisons"),
        ("ppo", len(data.prompts), "training prompts"),
    ):
        if count < config[stage].batch_size:
            raise ValueError(
                f"{count} {what}, fewer than one batch of config.{stage}.batch_size="
                f"{config[stage].batch_size}"
            )
    stages = ("sft", "rm", *ppo_stages(config))
    return {s: stage_config(config, s, counts.get(s, 0)) for s in stages}


def _train_stage(config, build, run_dir: Path, *inputs):
    """Trains a stage in ``run_dir`` and returns its parameters; exits if it stopped early
    (SIGTERM: saved; rerunning resumes it) rather than starting the next stage."""
    task, batches = build(config, *inputs)
    state = loop.train(task, batches, config, run_dir)
    if int(state.step) < config.train.steps * task.updates_per_step:
        sys.exit(f"stage {run_dir.name} stopped at update {int(state.step)}; rerun to resume")
    # Each process hands on the whole parameters (a run of several processes shards them).
    return multihost_utils.process_allgather(state.params, tiled=True)


def train(config: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Trains every stage in order, each resuming from its checkpoints."""
    config, tokenizer = resolve(config, workdir)
    data = read_data(config)
    configs = _check_sizes(config, data)

    def run(stage, build, *inputs):
        return _train_stage(configs[stage], build, stage_dir(config, workdir, stage), *inputs)

    base = load_base_params(config, workdir)
    sft = run("sft", build_sft, tokenizer, data, base)
    rm = run("rm", build_rm, tokenizer, data, sft)
    rm = saved_score_head(
        stage_dir(config, workdir, "rm") / NORMALIZER,
        rm,
        lambda: normalized_reward_params(configs["rm"], tokenizer, rm, sft, data),
    )
    for stage in ppo_stages(config):
        run(stage, build_ppo, tokenizer, data, sft, rm)


def load_reward_model(config, workdir: str | Path):
    """The reward model trained in ``workdir``, normalised as PPO used it."""

    def init_fn(run_config: dict):
        model = GPT(reward_config(run_config))
        return lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))

    rm_dir = stage_dir(config, workdir, "rm")
    _, variables, _ = checkpoint.load_trained(rm_dir, init_fn)
    return saved_score_head(rm_dir / NORMALIZER, variables["params"])
