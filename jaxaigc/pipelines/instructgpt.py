"""InstructGPT's inference: a trained policy's responses to instructions (the run:
:mod:`jaxaigc.systems.instructgpt`, its recipe :mod:`jaxaigc.configs.instructgpt`).

Text is bytes (vocabulary 256): a sequence is ``prompt + SEPARATOR + response + "\\n"``, the
newline being EOS (no task's answer contains one) and byte 0 the padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxaigc.configs import fields
from jaxaigc.configs.saved import load_run
from jaxaigc.configs.stages import stage_dir
from jaxaigc.data import instructions
from jaxaigc.data.text import decode_bytes, encode_bytes
from jaxaigc.data.tokenizers import Gpt2Tokenizer
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.sft import left_pad
from jaxaigc.pipelines.language_model import LanguageModel
from jaxaigc.sample.decode import generate
from jaxaigc.train import checkpoint

VOCAB, EOS, PAD = 256, ord("\n"), 0
SEPARATOR = " Answer: "
# The stages that train a policy; the PPO ones keep it beside the value model.
POLICY_STAGES = ("pretrain", "sft", "ppo", "ppo_ptx", "ppo_gold")
PPO_STAGES = ("ppo", "ppo_ptx", "ppo_gold")


def policy_config(config: ml_collections.ConfigDict | Mapping[str, Any]) -> GPTConfig:
    """The policy's GPT of a recipe config (or of its saved JSON)."""
    return fields.to_dataclass(GPTConfig, config["model"])


def prompt_bytes(prompt: str | instructions.Prompt) -> list[int]:
    text = prompt if isinstance(prompt, str) else prompt.text
    return encode_bytes(text + SEPARATOR).tolist()


def response_bytes(response: str) -> list[int]:
    # A newline would end the response early: it is EOS.
    return encode_bytes(response.replace("\n", " ")).tolist()


def response_text(tokens: np.ndarray, drawn: np.ndarray) -> str:
    """A sampled row's response up to its EOS, as text."""
    return decode_bytes(tokens[drawn & (tokens != EOS)])


def generate_responses(
    config: ml_collections.ConfigDict,
    params,
    prompts: Sequence[str | instructions.Prompt],
    *,
    temperature: float = 0.0,
    seed: int = 0,
    max_tokens: int | None = None,
) -> list[str]:
    """The policy's responses (greedy by default) to ``prompts``, up to EOS or ``max_tokens``
    bytes (at most the recipe's ``response_length``, which the context leaves after the
    prompt), in batches of 64 (batch i draws with the key ``seed + i``)."""
    steps = config.data.response_length
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        steps = min(steps, max_tokens)
    tokens, valid = left_pad(
        [prompt_bytes(p) for p in prompts],
        length=config.data.prompt_length,
        pad_id=PAD,
        vocab_size=VOCAB,
    )
    out = []
    for i in range(0, len(prompts), 64):
        samples = generate(
            policy_config(config),
            params,
            tokens[i : i + 64],
            valid=valid[i : i + 64],
            steps=steps,
            rng=jax.random.key(seed + i),
            temperature=temperature,
            eos_id=EOS,
            pad_id=PAD,
        )
        for row, mask in zip(np.asarray(samples.tokens), np.asarray(samples.mask), strict=True):
            out.append(response_text(row, mask))
    return out


def load_policy_model(run_dir: str | Path, *, ppo: bool) -> tuple[GPTConfig, Any]:
    """The policy's GPT and parameters of the stage trained in ``run_dir`` (``ppo``: a PPO
    stage, whose checkpoint holds the policy beside the value model; only the policy is read)."""
    configs = []

    def init_fn(run_config: dict):
        model_config = policy_config(run_config)
        configs.append(model_config)
        model = GPT(model_config)

        def init(rng: jax.Array):
            example = jnp.zeros((1, model_config.context_length), jnp.int32)
            params = model.init(rng, example)["params"]
            return {"params": {"policy": params} if ppo else params}

        return init

    _, variables, _ = checkpoint.load_trained(run_dir, init_fn)
    return configs[-1], variables["params"]["policy"] if ppo else variables["params"]


def load_policy_params(run_dir: str | Path, *, ppo: bool) -> Any:
    """:func:`load_policy_model`'s parameters alone."""
    return load_policy_model(run_dir, ppo=ppo)[1]


class Policy:
    """An InstructGPT policy read from its run: ``respond(prompts)`` answers instructions."""

    def __init__(self, config: ml_collections.ConfigDict, params: Any, stage: str):
        self.config, self.params, self.stage = config, params, stage

    def respond(
        self,
        prompts: Sequence[str],
        *,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        seed: int = 0,
    ) -> list[str]:
        """Responses to ``prompts`` (e.g. ``"Reverse the word dog."``), greedy at temperature
        0, each up to its end of line or ``max_tokens`` bytes."""
        return generate_responses(
            self.config,
            self.params,
            prompts,
            temperature=temperature,
            seed=seed,
            max_tokens=max_tokens,
        )


def load_policy(workdir: str | Path, stage: str = "ppo_ptx") -> Policy | LanguageModel:
    """The policy of ``stage`` (one of :data:`POLICY_STAGES`) of the InstructGPT run in
    ``workdir``; of an ``instructgpt-gpt2`` run, a :class:`LanguageModel` with the base GPT-2's
    tokenizer."""
    recipe, config = load_run(workdir)
    if recipe not in ("instructgpt", "instructgpt-gpt2"):
        raise ValueError(f"{workdir} holds a {recipe!r} run, not an instructgpt one")
    if stage not in POLICY_STAGES or stage not in config.stages:
        stages = [s for s in POLICY_STAGES if s in config.stages]
        raise ValueError(f"stage {stage!r} trains no policy; use one of {stages}")
    run_dir = stage_dir(config, workdir, stage)
    if not (run_dir / "checkpoints").is_dir():
        raise FileNotFoundError(
            f"{run_dir} holds no checkpoints of the {stage} stage: train it with "
            f"`jaxaigc train {recipe} --workdir {workdir}`"
        )
    model_config, params = load_policy_model(run_dir, ppo=stage in PPO_STAGES)
    if recipe == "instructgpt-gpt2":
        tokenizer = Gpt2Tokenizer.from_folder(stage_dir(config, workdir, "base"))
        return LanguageModel(model_config, params, tokenizer)
    return Policy(config, params, stage)
