"""InstructGPT end to end on the synthetic instruction tasks (Ouyang et al. 2022): a byte-level GPT
pretrained on the corpus -> SFT on demonstrations -> a reward model on K-way comparisons -> PPO
and PPO-ptx (and, with ``gold_reward_run``, PPO against the gold scorer) on prompts of the RL
tasks, against the reward model normalised on SFT samples (Ziegler et al. 2019).

Each stage is a :func:`jaxaigc.train.loop.train` run in its directory of ``config.stages``
(checkpointed, resumable) and starts from the previous stage's parameters; each PPO stage also
writes ``curve.jsonl``, its fixed evaluation batch's gold, reward, KL and pretraining NLL over
iterations (the evaluation: :mod:`jaxaigc.evaluate.instructgpt`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jaxaigc.configs import fields
from jaxaigc.configs.stages import stage_dir
from jaxaigc.data import instructions
from jaxaigc.data.pipeline import ArrayRecords, BatchIterator
from jaxaigc.data.text import pack
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.autoregressive import lm_loss_fn, next_token_nll
from jaxaigc.objectives.ppo import PPOConfig, fit_reward_normalizer
from jaxaigc.objectives.reward import (
    encode_comparison,
    normalize_rewards,
    pack_comparisons,
    reward_loss_fn,
    sequence_scores,
)
from jaxaigc.objectives.sft import encode_example, left_pad, sft_loss_fn
from jaxaigc.pipelines.instructgpt import (
    EOS,
    PAD,
    PPO_STAGES,
    VOCAB,
    generate_responses,
    load_policy_params,
    policy_config,
    prompt_bytes,
    response_bytes,
    response_text,
)
from jaxaigc.train import checkpoint, loop
from jaxaigc.train.ppo import load_params, make_ppo_task, saved_score_head
from jaxaigc.train.rollout import score_samples

SECTIONS = ("pretrain", "sft", "rm", "ppo")  # the config sections of the stages' schedules


def stage_config(config: ml_collections.ConfigDict, section: str) -> ml_collections.ConfigDict:
    """``config`` with the steps, batch size and learning rate of ``config[section]`` in
    ``train`` / ``optim``."""
    if section not in SECTIONS:
        raise ValueError(f"unknown stage {section!r}; use one of {SECTIONS}")
    out = ml_collections.ConfigDict(config.to_dict())
    out.train.steps, out.train.batch_size = config[section].steps, config[section].batch_size
    out.optim.peak_lr = config[section].peak_lr
    return out


def reward_config(config: ml_collections.ConfigDict) -> GPTConfig:
    policy = policy_config(config)
    extra = config.rm.extra_layers
    if extra < 0 or (extra and policy.scan_layers):
        raise ValueError(f"rm.extra_layers={extra}: must be >= 0, and 0 with scan_layers")
    return policy.replace(head="scalar", layers=policy.layers + extra)


def ppo_config(config: ml_collections.ConfigDict) -> PPOConfig:
    return fields.to_dataclass(PPOConfig, config.ppo.algorithm)


def ppo_stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The PPO stages the run trains: ppo and ppo_ptx, and ppo_gold with ``gold_reward_run``."""
    return PPO_STAGES if config.gold_reward_run else PPO_STAGES[:2]


def ppo_stage_config(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
    """The config a PPO stage trains with: its ``gamma_ptx`` and what scores its rollouts."""
    if stage not in PPO_STAGES:
        raise ValueError(f"unknown PPO stage {stage!r}; use one of {PPO_STAGES}")
    out = ml_collections.ConfigDict(config.to_dict())
    out.ppo.algorithm.gamma_ptx = config.ptx_gamma if stage == "ppo_ptx" else 0.0
    out.ppo.reward = "gold" if stage == "ppo_gold" else "model"
    return stage_config(out, "ppo")


def _lines(texts: Sequence[str], length: int) -> dict[str, np.ndarray]:
    """Texts as separate right-padded lines ``text + "\\n"`` of ``length + 1`` bytes, with the
    weights of their real targets (pads after the newline are not predicted)."""
    tokens = np.full((len(texts), length + 1), PAD, np.int32)
    for row, text in enumerate(texts):
        ids = response_bytes(text)[:length] + [EOS]
        tokens[row, : len(ids)] = ids
    weights = (np.arange(length)[None] < (tokens != PAD).sum(1)[:, None] - 1).astype(np.float32)
    return {"tokens": tokens, "weights": weights}


def corpus_lines(config: ml_collections.ConfigDict, n: int, *, seed: int) -> dict[str, np.ndarray]:
    texts, _ = instructions.pretraining_corpus(n, seed=seed, source=config.data.corpus_source)
    return _lines(texts, config.model.context_length - 1)


def _iterator(arrays: dict[str, np.ndarray], config, stage: str) -> BatchIterator:
    source = ArrayRecords(arrays, name=f"instructgpt-{stage}")
    return BatchIterator(source, global_batch_size=config[stage].batch_size, seed=config.seed)


def _init(model: GPT, length: int, params=None, name: str = "model"):
    def init(rng: jax.Array):
        boxed = model.init(rng, jnp.zeros((1, length), jnp.int32))
        return {"params": load_params(boxed["params"], params, name)}

    return init


def build_pretrain(config) -> tuple[loop.Task, BatchIterator]:
    """The byte LM on corpus lines."""
    model = GPT(policy_config(config))
    arrays = corpus_lines(config, config.data.corpus, seed=config.data.seed)
    length = config.model.context_length
    if config.data.pack:
        tokens = arrays["tokens"]
        arrays = pack({"tokens": tokens}, (tokens != PAD).sum(1), length=length)
        segments = arrays["segments"]
        # A target counts inside its own line: not the next line's first byte, not a pad.
        same = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
        arrays["weights"] = same.astype(np.float32)
    task = loop.Task(init=_init(model, length), loss_fn=lm_loss_fn(model))
    return task, _iterator(arrays, config, "pretrain")


def _fitted_length(config, pairs: Sequence[tuple[list[int], list[int]]]) -> int:
    """The sequence length that holds every (prompt, response) pair and its EOS, rounded up to
    a multiple of 8 and at most the context: pads past the longest row only cost compute."""
    longest = max(len(prompt) + len(response) + 1 for prompt, response in pairs)
    return min(config.model.context_length, -(-longest // 8) * 8)


def _truncated(config, response: str) -> list[int]:
    return response_bytes(response)[: config.data.response_length - 1]


def sft_arrays(config, examples: Sequence[instructions.Example]) -> dict[str, np.ndarray]:
    """Demonstrations as right-padded rows: ``tokens`` [n, t] and ``response_mask`` [n, t]."""
    pairs = [(prompt_bytes(e.prompt), _truncated(config, e.response)) for e in examples]
    length = _fitted_length(config, pairs)
    rows = [
        encode_example(p, r, length=length, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB)
        for p, r in pairs
    ]
    tokens, mask = (np.stack(x) for x in zip(*rows, strict=True))
    return {"tokens": tokens, "response_mask": mask}


def build_sft(config, pretrained_params) -> tuple[loop.Task, BatchIterator]:
    """Fine-tuning of the pretrained LM on demonstrations (response tokens only)."""
    model = GPT(policy_config(config))
    demos = instructions.demonstrations(
        config.data.demonstrations, seed=config.data.seed, tasks=config.data.tasks
    )
    if config.data.rl_demonstrations:
        demos += instructions.demonstrations(
            config.data.rl_demonstrations, seed=config.data.seed + 2, tasks=config.data.rl_tasks
        )
    task = loop.Task(
        init=_init(model, config.model.context_length, pretrained_params, "pretrained"),
        loss_fn=sft_loss_fn(model),
    )
    arrays = sft_arrays(config, demos)
    if config.data.sft_corpus:
        # Pretraining lines replayed beside the demonstrations, every byte after the first a
        # target, so that SFT does not forget the corpus that PPO-ptx's term measures.
        corpus = corpus_lines(config, config.data.sft_corpus, seed=config.data.seed)
        widen = ((0, 0), (0, corpus["tokens"].shape[1] - arrays["tokens"].shape[1]))
        corpus_mask = np.pad(corpus["weights"].astype(bool), ((0, 0), (1, 0)))
        arrays = {
            "tokens": np.concatenate(
                [np.pad(arrays["tokens"], widen, constant_values=PAD), corpus["tokens"]]
            ),
            "response_mask": np.concatenate([np.pad(arrays["response_mask"], widen), corpus_mask]),
        }
    if config.data.pack:
        lengths = _last(arrays["response_mask"]) + 1  # through the EOS
        arrays = pack(arrays, lengths, length=config.model.context_length)
    return task, _iterator(arrays, config, "sft")


def _comparison_bytes(config, comparison: instructions.Comparison):
    """The prompt's bytes and each response's, cut to the response length."""
    return prompt_bytes(comparison.prompt), [_truncated(config, r) for r in comparison.responses]


def comparison_arrays(config, comparisons) -> dict[str, np.ndarray]:
    """One comparison per row (:func:`~jaxaigc.objectives.reward.encode_comparison`)."""
    encoded = [_comparison_bytes(config, c) for c in comparisons]
    length = _fitted_length(config, [(p, r) for p, responses in encoded for r in responses])
    rows = [
        encode_comparison(
            prompt,
            responses,
            c.ranking,
            max_k=config.data.max_k,
            length=length,
            eos_id=EOS,
            pad_id=PAD,
            vocab_size=VOCAB,
        )
        for c, (prompt, responses) in zip(comparisons, encoded, strict=True)
    ]
    return {key: np.stack([r[key] for r in rows]) for key in rows[0]}


def sft_comparisons(
    config, sft_params, n: int, *, seed: int, split: str = "train"
) -> list[instructions.Comparison]:
    """``n`` prompts of the RL tasks, each with K (4 to ``max_k``) responses the SFT policy
    samples at temperature 1, ranked by the labeller."""
    prompts = instructions.make_prompts(n, seed=seed, split=split, tasks=config.data.rl_tasks)
    rng = np.random.default_rng(seed)
    sizes = rng.integers(4, config.data.max_k + 1, n)
    flat = [p for p, k in zip(prompts, sizes, strict=True) for _ in range(k)]
    samples = iter(generate_responses(config, sft_params, flat, temperature=1.0, seed=seed))
    temperature = config.data.labeller_temperature
    return [
        instructions.rank(p, [next(samples) for _ in range(k)], temperature=temperature, rng=rng)
        for p, k in zip(prompts, sizes, strict=True)
    ]


def build_rm(config, sft_params, *, cache: Path | None = None) -> tuple[loop.Task, BatchIterator]:
    """The reward model: the SFT transformer with a scalar head in place of the unembedding,
    trained on synthetic comparisons of every task, ``data.rl_comparisons`` more of the RL tasks,
    and ``data.sft_comparisons`` rankings of SFT samples of the RL tasks; their arrays kept in
    ``cache`` (:func:`cached_arrays`), so a resumed run does not sample SFT again."""
    model = GPT(reward_config(config))

    def init(rng: jax.Array):
        boxed = model.init(rng, jnp.zeros((1, config.model.context_length), jnp.int32))["params"]
        fresh = nn.meta.unbox(boxed)
        trunk = {k: v for k, v in sft_params.items() if k != "head"}
        trunk["score"] = fresh["score"]  # a fresh head
        # The SFT blocks at the bottom, rm.extra_layers fresh ones above them.
        trunk["transformer"] = {**fresh["transformer"], **sft_params["transformer"]}
        return {"params": load_params(boxed, trunk, "SFT")}

    task = loop.Task(init=init, loss_fn=reward_loss_fn(model))
    build = functools.partial(comparison_data, config, sft_params)
    # What the arrays depend on: the data, and the model, stages and seed that made SFT.
    sections = ("data", "model", "pretrain", "sft")
    key = {"seed": config.seed, **{name: config[name].to_dict() for name in sections}}
    arrays = build() if cache is None else cached_arrays(cache, key, build)
    return task, _iterator(arrays, config, "rm")


def comparison_data(config, sft_params) -> dict[str, np.ndarray]:
    """The reward model's training arrays (:func:`build_rm`)."""
    comparisons = instructions.comparisons(
        config.data.comparisons,
        seed=config.data.seed,
        k=(4, config.data.max_k),
        temperature=config.data.labeller_temperature,
        tasks=config.data.tasks,
    )
    if config.data.rl_comparisons:
        comparisons += instructions.comparisons(
            config.data.rl_comparisons,
            seed=config.data.seed + 4,
            k=(4, config.data.max_k),
            temperature=config.data.labeller_temperature,
            tasks=config.data.rl_tasks,
        )
    if config.data.sft_comparisons:
        comparisons += sft_comparisons(
            config, sft_params, config.data.sft_comparisons, seed=config.data.seed + 3
        )
    if not config.data.pack:
        return comparison_arrays(config, comparisons)
    return pack_comparisons(
        [(*_comparison_bytes(config, c), c.ranking) for c in comparisons],
        length=config.data.comparison_row,
        context_length=config.model.context_length,
        eos_id=EOS,
        pad_id=PAD,
        vocab_size=VOCAB,
    )


def cached_arrays(
    path: Path, key: dict, build: Callable[[], dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """``build()``'s arrays, written to ``path`` (``.npz``) with ``key``, the settings that made
    them, and read back while ``key`` is unchanged (a changed key or an unreadable file builds
    and writes them anew)."""
    key_text = json.dumps(key, sort_keys=True)
    try:
        with np.load(path) as saved:
            if str(saved["__key__"]) == key_text:
                return {name: saved[name] for name in saved.files if name != "__key__"}
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        print(f"WARNING: {path} is unreadable ({error}); building its arrays again", flush=True)
    arrays = build()
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".tmp.npz")
        np.savez(partial, __key__=np.asarray(key_text), **arrays)
        partial.replace(path)  # atomic: never half a file
    return arrays


def reward_scores(config, rm_params, tokens: np.ndarray, response_mask: np.ndarray) -> np.ndarray:
    """Scores [n] of right-padded sequences at their EOS, in batches of 64."""
    model = GPT(reward_config(config))
    valid = np.arange(tokens.shape[1])[None] <= _last(response_mask)[:, None]
    score = jax.jit(lambda p, t, v, m: sequence_scores(model, p, t, v, m))
    batches = [
        score(rm_params, tokens[i : i + 64], valid[i : i + 64], response_mask[i : i + 64])
        for i in range(0, len(tokens), 64)
    ]
    return np.concatenate([np.asarray(b) for b in batches])


def normalized_reward_params(config, rm_params, sft_params):
    """The reward model with its gain and bias set so that its scores of SFT samples (256 RL
    prompts at the rollout temperature) have mean 0 and standard deviation 1 (Ziegler et al.)."""
    prompts = instructions.rl_prompts(256, seed=config.data.seed + 5, tasks=config.data.rl_tasks)
    samples = sample_and_score(
        config, sft_params, sft_params, rm_params, prompts, seed=config.data.seed + 5
    )
    return normalize_rewards(rm_params, *fit_reward_normalizer(samples.reward))


@dataclasses.dataclass(frozen=True)
class ScoredSamples:
    """Responses sampled as PPO's rollouts are, each with ``kl`` [n], KL(policy || SFT) in nats
    (the sum over its tokens of log pi - log pi_SFT at the rollout temperature, as PPO's penalty
    counts it), the reward model's ``reward`` [n] and the ``gold`` score [n]."""

    prompts: list[instructions.Prompt]
    responses: list[str]
    kl: np.ndarray
    reward: np.ndarray
    gold: np.ndarray


def sample_and_score(
    config, params, sft_params, rm_params, prompts, *, seed: int, batch_size: int = 64
) -> ScoredSamples:
    """One response per prompt sampled as PPO's rollouts are (row i of the batch from i with
    key ``fold_in(key(seed), i)``), scored by KL to SFT, the reward model and the gold scorer."""
    models = {"policy": params, "reward": rm_params}
    if params is not sft_params:  # SFT's own KL is 0: no reference pass
        models["reference"] = sft_params
    tokens, valid = left_pad(
        [prompt_bytes(p) for p in prompts],
        length=config.data.prompt_length,
        pad_id=PAD,
        vocab_size=VOCAB,
    )
    responses, kl, reward = [], [], []
    for i in range(0, len(prompts), batch_size):
        # The last batch padded with copies of its first row: one compiled shape.
        rows = np.resize(np.arange(i, min(i + batch_size, len(prompts))), batch_size)
        out = score_samples(
            policy_config(config),
            reward_config(config),
            ppo_config(config),
            params=models,
            prompt=tokens[rows],
            prompt_valid=valid[rows],
            rng=jax.random.fold_in(jax.random.key(seed), i),
        )
        n = len(set(rows))
        drawn, mask = (np.asarray(out[k])[:n] for k in ("response", "mask"))
        responses += [response_text(t, m) for t, m in zip(drawn, mask, strict=True)]
        kl.append(np.asarray(out["kl"])[:n] if "kl" in out else np.zeros(n, np.float32))
        reward.append(np.asarray(out["raw_score"])[:n])
    return ScoredSamples(
        list(prompts),
        responses,
        np.concatenate(kl),
        np.concatenate(reward),
        gold_scores(prompts, responses),
    )


def _last(mask: np.ndarray) -> np.ndarray:
    return mask.shape[1] - 1 - np.argmax(mask[:, ::-1], axis=1)


def gold_scores(prompts: Sequence[instructions.Prompt], responses: Sequence[str]) -> np.ndarray:
    """The gold score (0-1) of each response to its prompt."""
    return np.array([instructions.score(p, r) for p, r in zip(prompts, responses, strict=True)])


def gold_reward(prompts: Sequence[instructions.Prompt], *, scale: float):
    """A PPO ``reward_fn``: ``scale`` times the gold score of each response to one of
    ``prompts``, each prompt found by its bytes."""
    by_bytes = {tuple(prompt_bytes(p)): p for p in prompts}

    def reward(prompt, prompt_valid, response, mask) -> np.ndarray:
        scores = []
        for row, valid, tokens, drawn in zip(prompt, prompt_valid, response, mask, strict=True):
            prompt_of_row = by_bytes[tuple(row[valid].tolist())]
            scores.append(scale * instructions.score(prompt_of_row, response_text(tokens, drawn)))
        return np.asarray(scores, np.float32)

    return reward


def ppo_batch_spec(config: ml_collections.ConfigDict) -> dict:
    """One PPO example's ``{name: (shape, dtype)}``: a left-padded prompt with its mask, and a
    pretraining line with its target weights (the ptx term)."""
    prompt, context = config.data.prompt_length, config.model.context_length
    return {
        "prompt": ((prompt,), jnp.int32),
        "prompt_valid": ((prompt,), jnp.bool_),
        "ptx": ((context,), jnp.int32),
        "ptx_weights": ((context - 1,), jnp.float32),
    }


def ppo_task(config, sft_params=None, rm_params=None, *, reward_fn=None) -> loop.Task:
    """The PPO iteration's task from the SFT policy and the normalised reward model (None: freshly
    initialised, to size the step); ``reward_fn`` replaces the reward model's score."""
    return make_ppo_task(
        policy_config(config),
        reward_config(config),
        ppo_config(config),
        policy_params=sft_params,
        reward_params=rm_params,
        reward_fn=reward_fn,
    )


def build_ppo(config, sft_params, rm_params) -> tuple[loop.Task, BatchIterator]:
    """PPO (``gamma_ptx`` 0) or PPO-ptx from the SFT policy and the normalised reward model, whose
    score of the rollouts the gold scorer replaces with ``ppo.reward="gold"``."""
    if config.ppo.reward not in ("model", "gold"):
        raise ValueError(f"ppo.reward must be 'model' or 'gold'; got {config.ppo.reward!r}")
    prompts = instructions.rl_prompts(
        config.data.rl_prompts, seed=config.data.seed, tasks=config.data.rl_tasks
    )
    prompt, valid = left_pad(
        [prompt_bytes(p) for p in prompts],
        length=config.data.prompt_length,
        pad_id=PAD,
        vocab_size=VOCAB,
    )
    corpus = corpus_lines(config, len(prompts), seed=config.data.seed + 1)
    arrays = {
        "prompt": prompt,
        "prompt_valid": valid,
        "ptx": corpus["tokens"],
        "ptx_weights": corpus["weights"],
    }
    gold = config.ppo.reward == "gold"
    reward_fn = gold_reward(prompts, scale=config.ppo.gold_scale) if gold else None
    task = ppo_task(config, sft_params, rm_params, reward_fn=reward_fn)
    return task, _iterator(arrays, config, "ppo")


def evaluation_prompts(config, tasks=None) -> dict[str, list[instructions.Prompt]]:
    """The held-out prompts of ``tasks`` (default the RL tasks) every policy is judged on: new
    prompts of the training templates and prompts of the held-out template."""
    seed, tasks = config.data.seed + 11, tasks or config.data.rl_tasks
    n = config.eval.prompts
    return {
        "train_templates": instructions.make_prompts(n, seed=seed, tasks=tasks),
        "held_out_template": instructions.make_prompts(n, seed=seed, split="held_out", tasks=tasks),
    }


CURVE = "curve.jsonl"


def _curve_hook(config, path: Path, sft_params, rm_params):
    """A loop hook appending to ``path`` every ``curve_every`` PPO iterations and at the last:
    on one fixed batch of held-out prompts (``eval.curve_prompts`` of the training templates,
    the same responses' keys each time), the mean gold score, reward and KL(policy || SFT) of
    responses sampled as the rollouts are, and the NLL per byte of held-out pretraining lines.
    A file, so that a resumed run keeps the points before its restart."""
    prompts = evaluation_prompts(config)["train_templates"][: config.eval.curve_prompts]
    lines = corpus_lines(config, config.eval.curve_prompts, seed=config.data.seed + 13)

    def hook(step: int, state, metrics) -> None:
        del metrics
        if step % config.eval.curve_every and step != config.ppo.steps:
            return
        policy = multihost_utils.process_allgather(state.params["policy"], tiled=True)
        samples = sample_and_score(config, policy, sft_params, rm_params, prompts, seed=0)
        point = {
            "step": step,
            "gold": float(samples.gold.mean()),
            "reward": float(samples.reward.mean()),
            "kl": float(samples.kl.mean()),
            "ptx_nll": pretraining_nll(config, policy, lines),
        }
        if jax.process_index() == 0:
            with path.open("a") as f:
                f.write(json.dumps(point) + "\n")

    return hook


def read_curve(run_dir: Path) -> list[dict]:
    """The points a PPO stage wrote to ``curve.jsonl`` by step; a step evaluated again after a
    restart keeps its last value."""
    path = run_dir / CURVE
    if not path.exists():
        return []
    points = {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}
    return [points[step] for step in sorted(points)]


def pretraining_nll(config, params, lines: dict[str, np.ndarray]) -> float:
    """Mean NLL per byte of corpus ``lines`` (:func:`corpus_lines`) under the policy."""
    nll = _nll_fn(policy_config(config))
    total = count = 0.0
    for i in range(0, len(lines["tokens"]), 64):
        s, c = nll(params, lines["tokens"][i : i + 64], lines["weights"][i : i + 64])
        total, count = total + float(s.sum()), count + float(c.sum())
    return total / count


@functools.cache
def _nll_fn(model_config: GPTConfig):
    model = GPT(model_config)

    @jax.jit
    def nll(params, tokens, weights):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return next_token_nll(logits, tokens[:, 1:], weights)

    return nll


def _train_stage(config, build, run_dir: Path, *inputs, hooks=()):
    """Trains a stage (``config``: its :func:`stage_config`) in ``run_dir`` and returns its
    parameters; exits if it stopped early (SIGTERM: saved; rerunning resumes it) rather than
    starting the next stage."""
    task, batches = build(config, *inputs)
    state = loop.train(task, batches, config, run_dir, hooks=hooks)
    if int(state.step) < config.train.steps * task.updates_per_step:
        sys.exit(f"stage {run_dir.name} stopped at update {int(state.step)}; rerun to resume")
    # Each process hands on the whole parameters (a run of several processes shards them).
    return multihost_utils.process_allgather(state.params, tiled=True)


def train(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Trains every stage in order, each resuming from its checkpoints."""

    def run_dir(stage: str) -> Path:
        return stage_dir(config, workdir, stage)

    pretrained = _train_stage(stage_config(config, "pretrain"), build_pretrain, run_dir("pretrain"))
    sft = _train_stage(stage_config(config, "sft"), build_sft, run_dir("sft"), pretrained)
    build = functools.partial(build_rm, cache=run_dir("rm") / RM_DATA)
    rm = _train_stage(stage_config(config, "rm"), build, run_dir("rm"), sft)
    rm = reward_model_for_ppo(config, rm, sft, run_dir("rm"))
    for stage in ppo_stages(config):
        stage_cfg = ppo_stage_config(config, stage)
        hook = _curve_hook(stage_cfg, run_dir(stage) / CURVE, sft, rm)
        _train_stage(stage_cfg, build_ppo, run_dir(stage), sft, rm, hooks=[hook])


NORMALIZER = "reward_normalizer.json"
RM_DATA = "comparisons.npz"  # the reward model's training arrays, kept for a resumed run


def reward_model_for_ppo(config, rm_params, sft_params, rm_dir: Path):
    """The normalised reward model (:func:`normalized_reward_params`), its score head kept in
    ``rm_dir / NORMALIZER`` (:func:`~jaxaigc.train.ppo.saved_score_head`)."""
    return saved_score_head(
        rm_dir / NORMALIZER,
        rm_params,
        lambda: normalized_reward_params(config, rm_params, sft_params),
    )


def load_reward_model(config: ml_collections.ConfigDict, workdir: Path):
    """The reward model trained in ``workdir``, normalised as PPO used it."""

    def init_fn(run_config: dict):
        model = GPT(reward_config(ml_collections.ConfigDict(run_config)))
        length = run_config["model"]["context_length"]
        return lambda rng: model.init(rng, jnp.zeros((1, length), jnp.int32))

    rm_dir = stage_dir(config, workdir, "rm")
    _, variables, _ = checkpoint.load_trained(rm_dir, init_fn)
    return saved_score_head(rm_dir / NORMALIZER, variables["params"])


def load_policies(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    """The policy parameters of every trained stage: pretrained, sft and the PPO stages."""
    names = {"pretrained": "pretrain", "sft": "sft", **{s: s for s in ppo_stages(config)}}
    return {
        name: load_policy_params(stage_dir(config, workdir, stage), ppo=stage in PPO_STAGES)
        for name, stage in names.items()
    }
