"""InstructGPT's three stages (Ouyang et al. 2022): supervised fine-tuning (:mod:`.sft`), the
reward model (:mod:`.reward`) and PPO-ptx (:mod:`.ppo` equations, :mod:`.iteration` the loop's
step)."""

from jaxaigc.rlhf.iteration import PPOConfig, make_ppo_task, ppo_loss_fn
from jaxaigc.rlhf.ppo import (
    adaptive_kl_beta,
    gae,
    kl_penalty_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from jaxaigc.rlhf.reward import (
    center_rewards,
    check_ranks,
    encode_comparison,
    pack_comparisons,
    pairwise_accuracy,
    ranking_loss,
    reward_loss_fn,
    score_at_eos,
    sequence_scores,
)
from jaxaigc.rlhf.sft import encode_example, left_pad, sft_loss_fn

__all__ = [
    "PPOConfig",
    "adaptive_kl_beta",
    "center_rewards",
    "check_ranks",
    "encode_comparison",
    "encode_example",
    "gae",
    "kl_penalty_rewards",
    "left_pad",
    "make_ppo_task",
    "pack_comparisons",
    "pairwise_accuracy",
    "policy_loss",
    "ppo_loss_fn",
    "ranking_loss",
    "reward_loss_fn",
    "score_at_eos",
    "sequence_scores",
    "sft_loss_fn",
    "value_loss",
    "whiten",
]
