"""InstructGPT's stages: byte layouts, packed rows, the reward model's trunk, comparisons of SFT
samples, the gold reward and the recipe's overrides."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxaigc.configs.instructgpt import get_config
from jaxaigc.data import instructions
from jaxaigc.models.gpt import GPT
from jaxaigc.objectives.sft import left_pad
from jaxaigc.pipelines.instructgpt import (
    EOS,
    PAD,
    SEPARATOR,
    VOCAB,
    policy_config,
    prompt_bytes,
    response_bytes,
)
from jaxaigc.systems import instructgpt as ig


def test_byte_layout():
    config = get_config()
    prompt = instructions.make_prompts(1, seed=0)[0]
    arrays = ig.sft_arrays(config, [instructions.Example(prompt, "olleh")])
    tokens, mask = arrays["tokens"][0], arrays["response_mask"][0]
    text = bytes(tokens[mask].astype(np.uint8).tolist()).decode()
    assert text == "olleh\n"  # the response and its EOS, nothing of the prompt
    assert bytes(tokens[: mask.argmax()].astype(np.uint8).tolist()).decode().endswith(SEPARATOR)
    assert prompt_bytes(prompt) == prompt_bytes(prompt.text)
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        ig.stage_config(config, "dpo")


def test_arrays_end_at_the_longest_row():
    config = get_config()
    short = instructions.Example(instructions.make_prompts(1, seed=0)[0], "olleh")
    n = len(prompt_bytes(short.prompt)) + len("olleh\n")
    assert ig.sft_arrays(config, [short])["tokens"].shape[1] == -(-n // 8) * 8
    long = instructions.Example(short.prompt, "x" * 200)  # cut to the response length
    n = len(prompt_bytes(short.prompt)) + config.data.response_length
    arrays = ig.sft_arrays(config, [short, long])
    assert arrays["tokens"].shape[1] == -(-n // 8) * 8 < config.model.context_length
    assert arrays["response_mask"][1].sum() == config.data.response_length  # 59 bytes and EOS


def _builders():
    return (
        ("pretrain", ig.build_pretrain, ()),
        ("sft", ig.build_sft, (None,)),
        ("rm", ig.build_rm, (None,)),
    )


def test_packed_stages_hold_every_sequence_once():
    """data.pack: corpus lines and demonstrations end to end in context-length rows; every
    target byte of the unpacked rows is still a target, none crosses into the next sequence.
    Comparisons hold each prompt once and every response once, in a seventh of the bytes."""
    config = get_config()
    config.data.update(corpus=300, demonstrations=300, comparisons=300, pack=False)
    config.data.update(sft_corpus=0, rl_demonstrations=0, rl_comparisons=0, sft_comparisons=0)
    plain = {s: b(ig.stage_config(config, s), *a) for s, b, a in _builders()}
    config.data.pack = True
    packed = {s: b(ig.stage_config(config, s), *a) for s, b, a in _builders()}
    for stage, key in (("pretrain", "weights"), ("sft", "response_mask")):
        a, b = (x[1].source.arrays for x in (plain[stage], packed[stage]))
        assert b["tokens"].shape[1] == config.model.context_length
        assert len(b["tokens"]) < 0.7 * len(a["tokens"])  # more than half of a row was pads
        assert b[key].sum() == a[key].sum()
        assert (b["tokens"] != PAD).sum() == (a["tokens"] != PAD).sum()
    weights, segments = (packed["pretrain"][1].source.arrays[k] for k in ("weights", "segments"))
    assert not (weights.astype(bool) & (segments[:, 1:] != segments[:, :-1])).any()
    a, b = (x[1].source.arrays for x in (plain["rm"], packed["rm"]))
    assert b["tokens"].shape[1] == config.data.comparison_row
    assert (b["response_rank"] > 0).sum() == (a["ranks"] >= 0).sum()  # every response's EOS
    assert b["tokens"].size < a["tokens"].size / 7


def test_sft_replays_corpus_lines_as_targets():
    """data.sft_corpus: pretraining lines join the demonstrations; every byte of a line but its
    first is a target, and no target is the first byte of a packed sequence."""
    config = get_config()
    config.data.update(demonstrations=100, rl_demonstrations=0, sft_corpus=0)
    plain = ig.build_sft(ig.stage_config(config, "sft"), None)[1].source.arrays
    config.data.sft_corpus = 50
    mixed = ig.build_sft(ig.stage_config(config, "sft"), None)[1].source.arrays
    corpus = ig.corpus_lines(config, 50, seed=config.data.seed)
    assert mixed["response_mask"].sum() == plain["response_mask"].sum() + corpus["weights"].sum()
    segments = mixed["segments"]
    first = np.concatenate([np.ones_like(segments[:, :1]), segments[:, 1:] != segments[:, :-1]], 1)
    assert not (mixed["response_mask"] & first.astype(bool)).any()


def test_reward_model_extra_layers_sit_above_the_sft_trunk():
    config = get_config()
    config.model.update(width=32, layers=1, heads=2)
    config.data.comparisons = 16  # packed: at least one batch of 8 rows
    config.data.update(rl_comparisons=0, sft_comparisons=0)
    config.rm.extra_layers = 2
    model = GPT(policy_config(config))
    tokens = jnp.zeros((1, config.model.context_length), jnp.int32)
    sft = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    task, _ = ig.build_rm(ig.stage_config(config, "rm"), sft)
    rm = nn.meta.unbox(task.init(jax.random.key(1))["params"])
    assert sorted(rm["transformer"]) == ["resblocks_0", "resblocks_1", "resblocks_2"]
    jax.tree.map(
        np.testing.assert_array_equal,
        rm["transformer"]["resblocks_0"],
        sft["transformer"]["resblocks_0"],
    )
    np.testing.assert_array_equal(rm["token_embedding"], sft["token_embedding"])
    assert "head" not in rm and ig.reward_config(config).layers == 3
    config.rm.extra_layers = -1
    with pytest.raises(ValueError, match="rm.extra_layers=-1"):
        ig.reward_config(config)


def test_the_reward_models_data_is_kept_for_a_resumed_run(tmp_path, monkeypatch):
    config = get_config()
    config.model.update(width=32, layers=1, heads=2)
    config.data.update(comparisons=16, rl_comparisons=0, sft_comparisons=2)
    config = ig.stage_config(config, "rm")
    model = GPT(policy_config(config))
    tokens = jnp.zeros((1, config.model.context_length), jnp.int32)
    sft = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    cache = tmp_path / "rm" / ig.RM_DATA
    _, batches = ig.build_rm(config, sft, cache=cache)
    built = batches.source.arrays
    assert cache.exists() and built["tokens"].shape[0] >= config.rm.batch_size

    def sample_again(*args, **kwargs):
        raise AssertionError("the resumed run sampled SFT again")

    monkeypatch.setattr(ig, "sft_comparisons", sample_again)
    _, batches = ig.build_rm(config, sft, cache=cache)
    assert batches.source.arrays.keys() == built.keys()
    for name, array in built.items():
        np.testing.assert_array_equal(batches.source.arrays[name], array)
    config.data.sft_comparisons = 3  # other settings: the arrays are built anew
    with pytest.raises(AssertionError, match="sampled SFT again"):
        ig.build_rm(config, sft, cache=cache)


def test_an_unreadable_cache_is_built_again(tmp_path):
    path = tmp_path / "arrays.npz"
    path.write_bytes(b"half a file")
    arrays = ig.cached_arrays(path, {"steps": 1}, lambda: {"x": np.arange(3)})
    np.testing.assert_array_equal(arrays["x"], np.arange(3))
    again = ig.cached_arrays(path, {"steps": 1}, lambda: pytest.fail("built again"))
    np.testing.assert_array_equal(again["x"], np.arange(3))


def test_sft_comparisons_rank_the_policys_samples():
    config = get_config()
    config.model.update(width=32, layers=1, heads=2)
    model = GPT(policy_config(config))
    tokens = jnp.zeros((1, config.model.context_length), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    data = ig.sft_comparisons(config, params, 5, seed=1)
    assert len(data) == 5
    for c in data:
        assert 4 <= len(c.responses) <= config.data.max_k
        assert sorted(c.ranking.tolist()) == list(range(len(c.responses)))
        assert c.scores.tolist() == [instructions.score(c.prompt, r) for r in c.responses]
    # Samples at temperature 1 of a random policy differ from one another.
    assert len({r for c in data for r in c.responses}) > len(data)
    again = ig.sft_comparisons(config, params, 5, seed=1)
    assert [c.responses for c in again] == [c.responses for c in data]
    arrays = ig.comparison_arrays(config, data)
    assert arrays["tokens"].shape[:2] == (5, config.data.max_k)


def test_the_gold_reward_scores_responses_to_their_own_prompts():
    prompts = instructions.rl_prompts(3, seed=0, tasks=instructions.HARD_TASKS)
    reward = ig.gold_reward(prompts, scale=3.0)
    prompt, valid = left_pad(
        [prompt_bytes(p) for p in prompts], length=100, pad_id=PAD, vocab_size=VOCAB
    )
    responses = [prompts[0].answer, prompts[1].answer + "x", ""]
    # Right-padded rows of response and EOS, as the sampler gives them.
    rows = [response_bytes(r) + [EOS] for r in responses]
    response = np.stack([np.pad(row, (0, 60 - len(row))) for row in rows]).astype(np.int32)
    mask = np.arange(60) < np.array([[len(row)] for row in rows])
    want = [3.0 * instructions.score(p, r) for p, r in zip(prompts, responses, strict=True)]
    np.testing.assert_allclose(reward(prompt, valid, response, mask), want, rtol=1e-6)
    assert want[0] == 3.0 and want[1] < 3.0
    config = get_config()
    config.ppo.reward = "oracle"
    with pytest.raises(ValueError, match="ppo.reward must be 'model' or 'gold'; got 'oracle'"):
        ig.build_ppo(ig.stage_config(config, "ppo"), None, None)


def test_each_ppo_stage_sets_its_ptx_term_and_reward():
    config = get_config()
    config.gold_reward_run = True
    stages = {s: ig.ppo_stage_config(config, s) for s in ig.ppo_stages(config)}
    assert {s: (c.ppo.algorithm.gamma_ptx, c.ppo.reward) for s, c in stages.items()} == {
        "ppo": (0.0, "model"),
        "ppo_ptx": (config.ptx_gamma, "model"),
        "ppo_gold": (0.0, "gold"),
    }
    assert all(c.train.steps == config.ppo.steps for c in stages.values())
    config.gold_reward_run = False
    assert ig.ppo_stages(config) == ("ppo", "ppo_ptx")


def test_kl_target_overrides_from_the_command_line():
    argv = ["jaxaigc", "--config.ppo.algorithm.kl_target=6"]
    values = flags.FlagValues()
    # config_flags defines the overrides it finds in the command line it is given.
    config_flags.DEFINE_config_dict("config", get_config(), flag_values=values, sys_argv=argv)
    values(argv)
    assert ig.ppo_config(values.config).kl_target == 6.0
    assert ig.ppo_config(get_config()).kl_target == 8.0


def test_the_reward_model_is_normalised_on_sft_samples(tmp_path):
    config = get_config(quick=True)
    model, scorer = GPT(policy_config(config)), GPT(ig.reward_config(config))
    tokens = jnp.zeros((1, config.model.context_length), jnp.int32)
    sft = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    rm = nn.meta.unbox(scorer.init(jax.random.key(1), tokens)["params"])
    normalised = ig.reward_model_for_ppo(config, rm, sft, tmp_path)
    # The samples it was fitted on: the SFT policy's, 256 RL prompts at the rollout temperature.
    prompts = instructions.rl_prompts(256, seed=config.data.seed + 5, tasks=config.data.rl_tasks)
    raw = ig.sample_and_score(config, sft, sft, rm, prompts, seed=config.data.seed + 5)
    assert raw.reward.std() > 0 and abs(raw.reward.mean()) > 1e-3  # the test could fail
    fitted = ig.sample_and_score(config, sft, sft, normalised, prompts, seed=config.data.seed + 5)
    assert fitted.responses == raw.responses
    assert abs(fitted.reward.mean()) < 1e-4 and fitted.reward.std() == pytest.approx(1, abs=1e-4)
    # Kept beside the reward model: a resumed run reads the same head without sampling.
    again = ig.reward_model_for_ppo(config, rm, None, tmp_path)
    jax.tree.map(np.testing.assert_array_equal, again, normalised)
