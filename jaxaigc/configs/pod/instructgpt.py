"""InstructGPT (Ouyang et al. 2022) on your own JSONL data, from a converted GPT-2: SFT on the
demonstrations -> a reward model on the comparisons -> PPO and PPO-ptx on the prompts, with the
paper's hyperparameters (Appendix C) where GPT-2 allows them. The layouts of the files:
:mod:`jaxaigc.data.preferences`; the run: :mod:`jaxaigc.systems.instructgpt_pod`.

    jaxaigc convert gpt2 gpt2-xl/model.safetensors /runs/gpt2-xl
    jaxaigc train instructgpt-gpt2 --workdir /runs/igpt --config.stages.base=/runs/gpt2-xl \\
        --config.data.demonstrations='gs://b/sft/*.jsonl' \\
        --config.data.comparisons='gs://b/hh/train.jsonl' --config.data.prompts='gs://b/rl/*.jsonl'
"""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import fields
from jaxaigc.configs.pod import full_size, pod_mesh
from jaxaigc.models.gpt import GPTConfig
from jaxaigc.objectives.ppo import PPOConfig
from jaxaigc.train.loop import default_train_config

GPT2_EOS = 50256  # <|endoftext|>; the run takes the ids from the base's tokenizer


def get_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    config = default_train_config()
    # The architecture (vocabulary, context, width, depth, heads) is the base's, read from its
    # run at training time; gpt2-xl here sizes the steps `jaxaigc plan` compiles. What this
    # section keeps: how the model computes (bf16, scanned blocks, full remat).
    config.model = full_size(GPTConfig, "gpt2-xl")
    # Appendix C: Adam with beta1 0.9 and beta2 0.95 for every model.
    config.optim.update(b2=0.95, warmup_steps=0)
    config.data = ml_collections.ConfigDict(
        dict(
            # JSONL patterns (comma-separated, globs, brace ranges, epath URLs); empty ones are
            # errors naming the field. Layouts: jaxaigc/data/preferences.py.
            demonstrations="",  # {"prompt", "response"}
            comparisons="",  # K-way rankings, or HH-RLHF {"chosen", "rejected"} pairs
            prompts="",  # {"prompt"}: PPO's episodes
            pretraining="",  # PPO-ptx's mix, {"text"} JSONL or plain text; "": demonstrations
            # Held-out files for the evaluation; empty: eval_fraction of the training files.
            eval_comparisons="",
            eval_prompts="",
            eval_fraction=0.05,
            seed=0,
            # Halves of GPT-2's 1,024 tokens, as the paper's 1k-token prompts and responses in
            # its 2k context. Longer prompts keep their last tokens (a dialogue's last turn).
            prompt_length=512,
            response_length=512,  # of demonstrations and compared responses, EOS included
            max_k=9,  # the most responses one ranking may hold (paper: K = 4 to 9)
        )
    )
    # C.1: 16 epochs, cosine to 10% without warmup, residual dropout 0.2; 9.65e-6 at batch 32
    # for the 1.3B and 6B policies. steps 0: epochs x demonstrations / batch_size.
    config.sft = ml_collections.ConfigDict(
        dict(
            epochs=16,
            steps=0,
            batch_size=32,
            peak_lr=9.65e-6,
            warmup_steps=0,
            end_lr_ratio=0.1,
            dropout_rate=0.2,
        )
    )
    # C.2: one epoch (more overfit), 9e-6 cosine to 10%, 64 prompts per batch with all their
    # C(K, 2) pairs. Then the score head is normalised on normalize_examples of its data:
    # "sft_samples", Ziegler et al.'s gain and bias (mean 0, std 1 on the SFT policy's samples of
    # training prompts), so that beta weighs the KL against a unit-scale score; "demonstrations",
    # the paper's bias alone (demonstrations score mean 0, section 3.5).
    config.rm = ml_collections.ConfigDict(
        dict(
            epochs=1,
            steps=0,
            batch_size=64,
            peak_lr=9e-6,
            warmup_steps=0,
            end_lr_ratio=0.1,
            normalize_on="sft_samples",
            normalize_examples=1024,
        )
    )
    # C.4: 256k episodes of 512 prompts (500 iterations), 8 minibatches of 64, one inner epoch;
    # a constant rate after a warmup over the first 10 iterations (80 updates, from 0 here, the
    # paper's from a tenth). 9e-6 is the paper's value-function rate: one optimizer trains the
    # policy and the value model here. The paper's weight EMA (0.992) is not kept.
    config.ppo = ml_collections.ConfigDict(
        dict(episodes=256_000, batch_size=512, peak_lr=9e-6, warmup_steps=80, end_lr_ratio=1.0)
    )
    config.ppo.algorithm = fields.section(
        PPOConfig(
            response_length=512,
            temperature=1.0,
            eos_id=GPT2_EOS,
            pad_id=GPT2_EOS,  # padded positions are masked, so EOS can pad
            epochs=1,
            minibatches=8,
            gamma=1.0,
            lam=0.95,
            clip_ratio=0.2,
            value_clip=0.2,
            kl_coef=0.02,  # beta
            gamma_ptx=27.8,  # the ppo_ptx stage's; the ppo stage trains with 0
        )
    )
    config.plain_ppo = True  # also train PPO without the pretraining mix (the paper's "PPO")
    # At most this many held-out prompts and comparisons; `samples` prompts shown with every
    # policy's responses.
    config.eval = ml_collections.ConfigDict(dict(prompts=512, comparisons=4096, samples=4))
    # base: a `jaxaigc convert gpt2` run, the policy's initial weights and its tokenizer.
    stages = dict(base="", sft="sft", rm="rm", ppo="ppo", ppo_ptx="ppo_ptx")
    config.stages = ml_collections.ConfigDict(stages, sort_keys=False)
    pod_mesh(config)
    if quick:
        config.model = full_size(GPTConfig, "gpt2-small", context_length=64, width=32, layers=2,
                                 heads=2, vocab_size=512)  # fmt: skip
        config.data.update(prompt_length=32, response_length=16)
        # EOS inside the tiny vocabulary (a run takes it from the base's tokenizer).
        config.ppo.algorithm.update(response_length=16, minibatches=2, eos_id=0, pad_id=0)
        # Batches divide over 8 devices (the tests' emulated mesh), PPO's minibatches too.
        config.sft.update(steps=2, batch_size=8)
        config.rm.update(steps=2, batch_size=8, normalize_examples=8)
        config.ppo.update(episodes=32, batch_size=16, warmup_steps=0)
        config.train.log_every = 1
        config.eval.update(prompts=8, comparisons=8, samples=2)
    return config
