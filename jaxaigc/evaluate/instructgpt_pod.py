"""InstructGPT on your own data (:mod:`jaxaigc.systems.instructgpt_pod`), evaluated without a gold
scorer: the reward model's pairwise accuracy on held-out comparisons (chance 50%); the mean
reward-model score of the SFT, PPO and PPO-ptx responses to held-out prompts, sampled as the
rollouts are (the rollout temperature; one key per prompt, the same for every policy); each PPO
policy's win-rate over SFT by the reward model on the same prompts (ties count half and are
reported); KL(PPO || SFT) per response, the sum over PPO's sampled tokens of log pi_PPO -
log pi_SFT (a Monte Carlo estimate, as the rollouts' KL penalty: a few prompts can make it
negative); a few prompts with every policy's response side by side.

The judge is the reward model the policies were trained against, which flatters them (Gao et al.
2022, reward over-optimisation): the KL beside each win-rate says how far they went to get it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxaigc.configs.stages import stage_dir
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.reward import pair_counts
from jaxaigc.pipelines.instructgpt import load_policy_params
from jaxaigc.sample.decode import generate, token_logprobs
from jaxaigc.systems import instructgpt_pod as pod

LABELS = {"sft": "SFT", "ppo": "PPO", "ppo_ptx": "PPO-ptx"}
BATCH = pod.SCORE_BATCH
NORMALIZED_ON = {  # the reward model's mean 0, by config.rm.normalize_on
    "sft_samples": "SFT's samples of training prompts, on which the reward model is normalised",
    "demonstrations": "demonstrations, on which the reward model is centred",
}


def rm_accuracy(config, tokenizer, rm_params, comparisons) -> dict:
    """The fraction of ranked pairs of ``comparisons`` the reward model orders as labelled."""
    arrays = pod.encoder(config, tokenizer).comparisons(comparisons)
    b, k, t = arrays["tokens"].shape
    tokens, mask = (arrays[key].reshape(b * k, t) for key in ("tokens", "response_mask"))
    scores = pod.reward_scores(config, rm_params, tokens, pod.right_padded_valid(mask), mask)
    correct, pairs = pair_counts(scores.reshape(b, k), arrays["ranks"])
    right, total = int(correct.sum()), int(pairs.sum())
    return {"accuracy": right / total, "pairs": total, "comparisons": b}


def sample(config, params, prompt: np.ndarray, valid: np.ndarray, *, seed: int):
    """The policy's responses to left-padded prompts as the rollouts draw them: (tokens int32
    [n, r], mask bool [n, r]); row i draws with key i of ``seed``, whatever the batching."""
    a = config.ppo.algorithm
    keys = jax.random.split(jax.random.key(seed), len(prompt))
    tokens, masks = [], []
    for i in range(0, len(prompt), BATCH):
        samples = generate(
            pod.policy_config(config),
            params,
            prompt[i : i + BATCH],
            valid=valid[i : i + BATCH],
            steps=a.response_length,
            rng=keys[i : i + BATCH],
            temperature=a.temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            eos_id=a.eos_id,
            pad_id=a.pad_id,
        )
        tokens.append(np.asarray(samples.tokens))
        masks.append(np.asarray(samples.mask))
    return np.concatenate(tokens), np.concatenate(masks)


def _sequences(prompt, valid, response, mask):
    """Prompts and responses end to end: (tokens, valid, response_mask), each [n, p + r]."""
    return (
        np.concatenate([prompt, response], 1),
        np.concatenate([valid, mask], 1),
        np.concatenate([np.zeros_like(valid), mask], 1),
    )


def response_scores(config, rm_params, prompt, valid, response, mask) -> np.ndarray:
    """The reward model's score [n] of each response to its prompt."""
    return pod.reward_scores(config, rm_params, *_sequences(prompt, valid, response, mask))


@functools.cache
def _logprobs(model_config: GPTConfig, temperature: float, steps: int):
    model = GPT(model_config)

    def logprobs(params, tokens, valid):
        logits = model.apply({"params": params}, tokens, valid=valid)
        return token_logprobs(logits[:, -steps - 1 : -1], tokens[:, -steps:], temperature)

    return jax.jit(logprobs)


def response_kl(config, params, reference, prompt, valid, response, mask) -> np.ndarray:
    """KL(policy || reference) of each response [n] the policy drew: the sum over its tokens of
    log pi - log pi_ref at the sampling temperature, as the rollouts' KL penalty."""
    a = config.ppo.algorithm
    logprobs = _logprobs(pod.policy_config(config), a.temperature, response.shape[1])
    tokens, full_valid, _ = _sequences(prompt, valid, response, mask)
    kl = []
    for i in range(0, len(tokens), BATCH):
        rows = (tokens[i : i + BATCH], full_valid[i : i + BATCH])
        difference = logprobs(params, *rows) - logprobs(reference, *rows)
        kl.append(np.asarray(difference * mask[i : i + BATCH]).sum(1))
    return np.concatenate(kl)


def evaluate(workdir: Path, config: ml_collections.ConfigDict) -> dict:
    """The report of the run in ``workdir`` (its figures and the details)."""
    workdir = Path(workdir)
    config, tokenizer = pod.resolve(config, workdir)
    data = pod.read_data(config)
    rm = pod.load_reward_model(config, workdir)
    policies = {
        name: load_policy_params(stage_dir(config, workdir, name), ppo=name in pod.PPO_STAGES)
        for name in ("sft", *pod.ppo_stages(config))
    }
    prompts = data.eval_prompts[: config.eval.prompts]
    prompt, valid = pod.encoder(config, tokenizer).prompts(prompts)
    samples, scores = {}, {}
    for name, params in policies.items():
        samples[name] = sample(config, params, prompt, valid, seed=config.seed)
        scores[name] = response_scores(config, rm, prompt, valid, *samples[name])
    wins, ties, kl = {}, {}, {}
    for name in pod.ppo_stages(config):
        difference = scores[name] - scores["sft"]
        wins[name] = float((difference > 0).mean() + 0.5 * (difference == 0).mean())
        ties[name] = float((difference == 0).mean())
        kl[name] = float(
            response_kl(config, policies[name], policies["sft"], prompt, valid, *samples[name])
            .mean()
        )  # fmt: skip
    examples = [
        {"prompt": text} | {
            name: {
                "response": tokenizer.decode(samples[name][0][row][samples[name][1][row]]),
                "score": float(scores[name][row]),
            }
            for name in policies
        }
        for row, text in enumerate(prompts[: config.eval.samples])
    ]  # fmt: skip
    report = {
        "reward_model": rm_accuracy(
            config, tokenizer, rm, data.eval_comparisons[: config.eval.comparisons]
        ),
        "held_out_prompts": len(prompts),
        "temperature": config.ppo.algorithm.temperature,
        "reward_normalized_on": config.rm.normalize_on,
        "rm_score": {name: float(s.mean()) for name, s in scores.items()},
        "win_rate_over_sft": wins,  # by the reward model; ties count half
        "tie_rate_with_sft": ties,
        "kl_from_sft": kl,  # nats per response
        "skipped_lines": data.skipped,
        "examples": examples,
    }
    return {
        "title": "InstructGPT from GPT-2 on your own data",
        "figures": _figures(report),
        **report,
    }


def _figure(name: str, value: float, baseline: float, baseline_name: str, unit: str = "") -> dict:
    return {"name": name, "value": value, "baseline": baseline, "baseline_name": baseline_name,
            "unit": unit}  # fmt: skip


def _figures(report: dict) -> list[dict]:
    """Each figure beside its baseline: accuracy against chance, win-rates against 50% (SFT
    against itself), scores against SFT's (SFT's against the demonstrations' 0), KL against 0."""
    rm = report["reward_model"]
    figures = [
        _figure(
            f"reward model pairwise accuracy, held-out comparisons ({rm['pairs']} pairs of "
            f"{rm['comparisons']} prompts)",
            rm["accuracy"], 0.5, "chance", "%",
        )
    ]  # fmt: skip
    n, t = report["held_out_prompts"], report["temperature"]
    score = report["rm_score"]
    what = f"{n} held-out prompts, sampled at T={t:g}"
    figures.append(
        _figure(f"SFT mean reward-model score, {what}", score["sft"], 0.0,
                NORMALIZED_ON[report["reward_normalized_on"]])
    )  # fmt: skip
    for name, wins in report["win_rate_over_sft"].items():
        label, ties = LABELS[name], report["tie_rate_with_sft"][name]
        figures += [
            _figure(f"{label} wins over SFT by the reward model, {what} (ties {ties:.0%}, "
                    "counted half)", wins, 0.5, "SFT against itself", "%"),
            _figure(f"{label} mean reward-model score, {what}", score[name], score["sft"], "SFT"),
            _figure(f"KL({label} || SFT) per response, nats", report["kl_from_sft"][name], 0.0,
                    "SFT"),
        ]  # fmt: skip
    return figures
