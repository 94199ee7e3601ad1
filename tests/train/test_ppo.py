"""One PPO-ptx iteration (rollout, scoring, GAE, PPO epochs) as one step of the generic loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc import parallel
from jaxaigc.data.pipeline import BatchIterator
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.objectives.ppo import PPOConfig, ppo_loss_fn
from jaxaigc.objectives.sft import left_pad
from jaxaigc.train.loop import default_train_config, train
from jaxaigc.train.metrics import read_metrics
from jaxaigc.train.optim import make_optimizer
from jaxaigc.train.ppo import make_ppo_task
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import jit_train_step
from tests.helpers import assert_one_step_matches_one_device, assert_trees_equal

POLICY = GPTConfig(vocab_size=16, context_length=16, width=32, layers=1, heads=2)
REWARD = POLICY.replace(head="scalar", width=16, heads=1)
PPO = PPOConfig(
    response_length=7, eos_id=1, pad_id=0, epochs=2, minibatches=2, gamma_ptx=0.5, kl_coef=0.1
)


class _Rows:
    """Prompts of 1 to 8 tokens, left-padded, with pretraining rows for the ptx term."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        prompts = [rng.integers(2, 16, rng.integers(1, 9)).tolist() for _ in range(n)]
        self.prompt, self.valid = left_pad(prompts, length=8, pad_id=0, vocab_size=16)
        self.ptx = rng.integers(2, 16, (n, 10)).astype(np.int32)

    def __len__(self):
        return len(self.ptx)

    def __getitem__(self, i):
        weights = np.ones(9, np.float32)
        return {
            "prompt": self.prompt[i],
            "prompt_valid": self.valid[i],
            "ptx": self.ptx[i],
            "ptx_weights": weights,
        }

    def __repr__(self):
        return "ppo-test-prompts"


def _batch(n: int = 8) -> dict:
    rows = _Rows(n)
    return {k: np.stack([rows[i][k] for i in range(n)]) for k in rows[0]}


def _run(mesh, rules, ppo=PPO, reward_fn=None):
    task = make_ppo_task(POLICY, REWARD, ppo, reward_fn=reward_fn)
    tx, schedule = make_optimizer(peak_lr=3e-3, total_steps=10 * task.updates_per_step)
    state, shardings, _ = create_sharded_state(task.init, tx, jax.random.key(0), mesh, rules)
    step = task.make_step(tx, rng=jax.random.key(1), schedule=schedule)
    batch = parallel.shard_batch(_batch(), mesh)
    return state, jit_train_step(step, mesh, rules, shardings, batch), batch


def test_kl_is_zero_and_the_ratio_one_at_initialisation(mesh_1):
    ppo = PPOConfig(response_length=7, eos_id=1, epochs=1, minibatches=1, kl_coef=0.1)
    state, step, batch = _run(mesh_1, parallel.make_rules(), ppo)
    state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    assert metrics["rollout/kl"] == 0.0  # the policy is the SFT reference
    # The loss recomputes the log-probs inside the gradient's program: equal to rounding (~1e-7),
    # so the mean ratio is 1 in float32.
    assert metrics["train/ratio"] == 1.0 and metrics["train/approx_kl"] < 1e-12
    assert metrics["train/clip_fraction"] == 0.0
    np.testing.assert_allclose(metrics["rollout/return"], metrics["rollout/score"], rtol=1e-6)
    assert int(state.step) == 1
    # After the update the policy has moved away from the frozen reference.
    _, metrics = step(state, batch)
    assert float(metrics["rollout/kl"]) != 0.0


def test_no_gradient_from_padded_positions():
    """Whatever sits at pads (before the prompt, after each EOS) changes neither loss nor
    gradient."""
    policy, value = GPT(POLICY), GPT(REWARD)
    example = jnp.zeros((1, 16), jnp.int32)
    params = {
        "policy": nn.meta.unbox(policy.init(jax.random.key(0), example)["params"]),
        "value": nn.meta.unbox(value.init(jax.random.key(1), example)["params"]),
    }
    rng = np.random.default_rng(0)
    prompt, prompt_valid = left_pad([[3, 4, 5], [6]], length=4, pad_id=0, vocab_size=16)
    mask = np.arange(7)[None] < np.array([[3], [7]])  # row 0 stopped after 3 tokens
    response = np.where(mask, rng.integers(2, 16, (2, 7)), 0)
    ptx = rng.integers(2, 16, (2, 10)).astype(np.int32)
    batch = {
        "tokens": np.concatenate([prompt, response], 1).astype(np.int32),
        "valid": np.concatenate([prompt_valid, mask], 1),
        "mask": mask,
        "old_logprobs": rng.normal(-2, 0.5, (2, 7)).astype(np.float32),
        "old_values": rng.normal(size=(2, 7)).astype(np.float32),
        "advantages": rng.normal(size=(2, 7)).astype(np.float32),
        "returns": rng.normal(size=(2, 7)).astype(np.float32),
        "ptx": ptx,
        "ptx_weights": np.concatenate([np.ones((2, 6)), np.zeros((2, 3))], 1).astype(np.float32),
    }
    noise = {k: v.copy() for k, v in batch.items()}
    noise["tokens"][~noise["valid"]] = 13
    for key in ("old_logprobs", "old_values", "advantages", "returns"):
        noise[key][~mask] = 1e3
    noise["ptx"][:, 7:] = 9  # targets 7..9 have weight 0
    loss_fn = ppo_loss_fn(policy, value, PPO)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None)[0]))
    (loss, grads), (loss2, grads2) = grad_fn(params, batch), grad_fn(params, noise)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(grads["policy"]["token_embedding"]).max()) > 0


def test_one_iteration_on_the_mesh_equals_one_device(mesh_1, mesh_2x2x2):
    assert_one_step_matches_one_device(lambda mesh, rules: _run(mesh, rules), mesh_1, mesh_2x2x2)


def _fives(prompt, prompt_valid, response, mask):
    """A programmatic reward: the share of token 5 among the drawn tokens."""
    del prompt, prompt_valid
    return ((response == 5) & mask).sum(1).astype(np.float32) / response.shape[1]


def test_a_programmatic_reward_on_the_mesh_equals_one_device(mesh_1, mesh_2x2x2):
    assert_one_step_matches_one_device(
        lambda mesh, rules: _run(mesh, rules, reward_fn=_fives), mesh_1, mesh_2x2x2
    )


def test_ppo_raises_a_programmatic_reward(tmp_path, mesh_1):
    config = default_train_config()
    config.train.update(steps=25, batch_size=16, log_every=1)
    config.optim.update(peak_lr=3e-3, warmup_steps=0)
    ppo = PPOConfig(response_length=7, eos_id=1, minibatches=2, kl_coef=0.0)
    task = make_ppo_task(POLICY, REWARD, ppo, reward_fn=_fives)
    batches = BatchIterator(_Rows(64), global_batch_size=16, seed=0)
    train(task, batches, config, tmp_path, mesh=mesh_1)
    scores = [r["rollout/score"] for r in read_metrics(tmp_path) if "rollout/score" in r]
    # From chance (token 5 is 1 of 14 drawable tokens) to most of each response.
    assert scores[0] < 0.15 and np.mean(scores[-5:]) > 0.6, scores


def test_ppo_trains_through_the_loop_and_resumes(tmp_path, mesh_1):
    config = default_train_config()
    config.train.update(steps=3, batch_size=8, checkpoint_every=2, log_every=1)
    config.optim.update(peak_lr=3e-3, warmup_steps=0)
    ppo = PPOConfig(response_length=7, eos_id=1, minibatches=2, kl_target=1.0, kl_coef=0.1)
    task = make_ppo_task(POLICY, REWARD, ppo)

    def batches():
        return BatchIterator(_Rows(32), global_batch_size=8, seed=0)

    straight = train(task, batches(), config, tmp_path / "straight", mesh=mesh_1)

    def crash(step, state, metrics):
        if step == 2:  # after step 2's checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(task, batches(), config, tmp_path / "resumed", mesh=mesh_1, hooks=[crash])
    resumed = train(task, batches(), config, tmp_path / "resumed", mesh=mesh_1)
    assert int(resumed.step) == 3 * task.updates_per_step
    assert_trees_equal(resumed.params, straight.params)
    assert_trees_equal(resumed.model_state, straight.model_state)
    # The adaptive controller moved beta, and beta was checkpointed with the rest.
    assert float(straight.model_state["kl"]["beta"]) != np.float32(0.1)


def test_bad_inputs_are_named(mesh_1):
    with pytest.raises(ValueError, match=r"vocabulary \(16\) and the reward model's \(20\)"):
        make_ppo_task(POLICY, REWARD.replace(vocab_size=20), PPO)
    with pytest.raises(ValueError, match="eos_id 16 is outside the vocabulary of 16"):
        make_ppo_task(POLICY, REWARD, PPOConfig(eos_id=16))
    # A reward model of another width than the reward config (the value model's too).
    wide = GPT(REWARD.replace(width=32, heads=2))
    wide_params = wide.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    task = make_ppo_task(POLICY, REWARD, PPO, reward_params=nn.meta.unbox(wide_params))
    message = r"reward parameter \['ln_final'\]\['bias'\] has shape \(32,\).*expects \(16,\)"
    with pytest.raises(ValueError, match=message):
        task.init(jax.random.key(0))
    # A prompt longer than the context leaves no room for the response.
    long = PPOConfig(response_length=9, eos_id=1)
    state, step, batch = _run(mesh_1, parallel.make_rules(), long)
    with pytest.raises(ValueError, match="prompt length 8 \\+ response length 9 exceeds"):
        step(state, batch)
    with pytest.raises(ValueError, match="prompt 0 has 9 tokens; the prompt length is 8"):
        left_pad([list(range(2, 11))], length=8, pad_id=0, vocab_size=16)
