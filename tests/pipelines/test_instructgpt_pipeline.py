"""The InstructGPT pipeline end to end on a toy configuration: every stage trains, checkpoints and
hands its parameters on; the report holds every figure."""

import importlib.util
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from jaxaigc.pipelines import instructgpt as ig

SCRIPT = Path(__file__).parents[2] / "experiments" / "instructgpt" / "train_instructgpt.py"


def _experiment():
    spec = importlib.util.spec_from_file_location("train_instructgpt", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_byte_layout():
    config = ig.get_config()
    prompt = ig.instructions.make_prompts(1, seed=0)[0]
    arrays = ig._sft_arrays(config, [ig.instructions.Example(prompt, "olleh")])
    tokens, mask = arrays["tokens"][0], arrays["response_mask"][0]
    text = bytes(tokens[mask].astype(np.uint8).tolist()).decode()
    assert text == "olleh\n"  # the response and its EOS, nothing of the prompt
    assert bytes(tokens[: mask.argmax()].astype(np.uint8).tolist()).decode().endswith(ig.SEPARATOR)
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        ig.stage_config(config, "dpo")


def test_arrays_end_at_the_longest_row():
    config = ig.get_config()
    short = ig.instructions.Example(ig.instructions.make_prompts(1, seed=0)[0], "olleh")
    n = len(ig.prompt_bytes(short.prompt)) + len("olleh\n")
    assert ig._sft_arrays(config, [short])["tokens"].shape[1] == -(-n // 8) * 8
    long = ig.instructions.Example(short.prompt, "x" * 200)  # cut to the response length
    n = len(ig.prompt_bytes(short.prompt)) + config.data.response_length
    arrays = ig._sft_arrays(config, [short, long])
    assert arrays["tokens"].shape[1] == -(-n // 8) * 8 < config.model.context_length
    assert arrays["response_mask"][1].sum() == config.data.response_length  # 59 bytes and EOS


def test_packed_stages_hold_every_sequence_once():
    """data.pack: corpus lines and demonstrations end to end in context-length rows; every
    target byte of the unpacked rows is still a target, none crosses into the next sequence.
    Comparisons hold each prompt once and every response once, in a seventh of the bytes."""
    config = ig.get_config()
    config.data.update(corpus=300, demonstrations=300, comparisons=300, pack=False)
    plain = {s: b(ig.stage_config(config, s), *a) for s, b, a in _builders()}
    config.data.pack = True
    packed = {s: b(ig.stage_config(config, s), *a) for s, b, a in _builders()}
    for stage, key in (("pretrain", "weights"), ("sft", "response_mask")):
        a, b = (x[1].source.arrays for x in (plain[stage], packed[stage]))
        assert b["tokens"].shape[1] == config.model.context_length
        assert len(b["tokens"]) < 0.7 * len(a["tokens"])  # more than half of a row was pads
        assert b[key].sum() == a[key].sum()
        assert (b["tokens"] != ig.PAD).sum() == (a["tokens"] != ig.PAD).sum()
    weights, segments = (packed["pretrain"][1].source.arrays[k] for k in ("weights", "segments"))
    assert not (weights.astype(bool) & (segments[:, 1:] != segments[:, :-1])).any()
    a, b = (x[1].source.arrays for x in (plain["rm"], packed["rm"]))
    assert b["tokens"].shape[1] == config.data.comparison_row
    assert (b["response_rank"] > 0).sum() == (a["ranks"] >= 0).sum()  # every response's EOS
    assert b["tokens"].size < a["tokens"].size / 7


def test_sft_replays_corpus_lines_as_targets():
    """data.sft_corpus: pretraining lines join the demonstrations; every byte of a line but its
    first is a target, and no target is the first byte of a packed sequence."""
    config = ig.get_config()
    config.data.update(demonstrations=100, sft_corpus=0)
    plain = ig.build_sft(ig.stage_config(config, "sft"), None)[1].source.arrays
    config.data.sft_corpus = 50
    mixed = ig.build_sft(ig.stage_config(config, "sft"), None)[1].source.arrays
    corpus = ig.corpus_lines(config, 50, seed=config.data.seed)
    assert mixed["response_mask"].sum() == plain["response_mask"].sum() + corpus["weights"].sum()
    segments = mixed["segments"]
    first = np.concatenate([np.ones_like(segments[:, :1]), segments[:, 1:] != segments[:, :-1]], 1)
    assert not (mixed["response_mask"] & first.astype(bool)).any()


def _builders():
    return (
        ("pretrain", ig.build_pretrain, ()),
        ("sft", ig.build_sft, (None,)),
        ("rm", ig.build_rm, (None,)),
    )


def test_reward_model_extra_layers_sit_above_the_sft_trunk():
    config = ig.get_config()
    config.model.update(width=32, layers=1, heads=2)
    config.data.comparisons = 16  # packed: at least one batch of 8 rows
    config.rm.extra_layers = 2
    model = ig.GPT(ig.policy_config(config))
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


def test_sft_comparisons_rank_the_policys_samples():
    config = ig.get_config()
    config.model.update(width=32, layers=1, heads=2)
    model = ig.GPT(ig.policy_config(config))
    tokens = jnp.zeros((1, config.model.context_length), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    data = ig.sft_comparisons(config, params, 5, seed=1)
    assert len(data) == 5
    for c in data:
        assert 4 <= len(c.responses) <= config.data.max_k
        assert sorted(c.ranking.tolist()) == list(range(len(c.responses)))
        assert c.scores.tolist() == [ig.instructions.score(c.prompt, r) for r in c.responses]
    # Samples at temperature 1 of a random policy differ from one another.
    assert len({r for c in data for r in c.responses}) > len(data)
    again = ig.sft_comparisons(config, params, 5, seed=1)
    assert [c.responses for c in again] == [c.responses for c in data]
    arrays = ig.comparison_arrays(config, data)
    assert arrays["tokens"].shape[:2] == (5, config.data.max_k)


def test_the_gold_reward_scores_responses_to_their_own_prompts():
    prompts = ig.instructions.rl_prompts(3, seed=0)
    reward = ig.gold_reward(prompts, scale=3.0)
    prompt, valid = ig.left_pad(
        [ig.prompt_bytes(p) for p in prompts], length=100, pad_id=ig.PAD, vocab_size=ig.VOCAB
    )
    responses = [prompts[0].answer, prompts[1].answer + "x", ""]
    # Right-padded rows of response and EOS, as the sampler gives them.
    rows = [ig.response_bytes(r) + [ig.EOS] for r in responses]
    response = np.stack([np.pad(row, (0, 60 - len(row))) for row in rows]).astype(np.int32)
    mask = np.arange(60) < np.array([[len(row)] for row in rows])
    want = [3.0 * ig.instructions.score(p, r) for p, r in zip(prompts, responses, strict=True)]
    np.testing.assert_allclose(reward(prompt, valid, response, mask), want, rtol=1e-6)
    assert want[0] == 3.0 and want[1] < 3.0
    config = ig.get_config()
    config.ppo.reward = "oracle"
    with pytest.raises(ValueError, match="ppo.reward must be 'model' or 'gold'; got 'oracle'"):
        ig.build_ppo(ig.stage_config(config, "ppo"), None, None)


def test_kl_target_overrides_from_the_command_line():
    argv = ["train_instructgpt", "--config.ppo.algorithm.kl_target=6"]
    values = flags.FlagValues()
    # config_flags defines the overrides it finds in the command line it is given.
    config_flags.DEFINE_config_dict("config", ig.get_config(), flag_values=values, sys_argv=argv)
    values(argv)
    assert ig.ppo_config(values.config).kl_target == 6.0
    assert ig.ppo_config(ig.get_config()).kl_target is None  # a fixed beta by default


@pytest.mark.slow
def test_toy_run_end_to_end(tmp_path):
    experiment = _experiment()
    config = experiment.get_config()
    config.model.update(width=32, layers=1, heads=2)
    config.data.update(demonstrations=64, comparisons=32, rl_prompts=16, corpus=64)
    # Batches divide over the 8 emulated devices; PPO minibatches too.
    for stage, steps, batch in (("pretrain", 2, 8), ("sft", 2, 8), ("rm", 2, 8), ("ppo", 2, 16)):
        config[stage].update(steps=steps, batch_size=batch)
    config.train.log_every = 1
    config.eval.update(prompts=8, comparisons=8, corpus=16, curve_prompts=8, curve_every=1)
    report = experiment.run(config, tmp_path)
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "ppo_gold"):
        assert (tmp_path / stage / "checkpoints" / "2").is_dir(), stage
    assert 0 <= report["reward_model"]["accuracy"] <= 1 and report["reward_model"]["pairs"] > 0
    assert set(report["gold_score"]) == {
        f"{n}/{s}"
        for n in ("sft", "ppo", "ppo_ptx", "ppo_gold")
        for s in ("train_templates", "held_out_template")
    }
    assert len(report["curves"]["ppo"]["rollout/kl"]) == 2
    assert report["curves"]["ppo"]["rollout/kl"][0][1] == 0.0  # the policy starts as SFT
    assert (
        report["curves"]["ppo_ptx"]["train/ptx_nll"]
        and not report["curves"]["ppo"]["train/ptx_nll"]
    )
    assert all(np.isfinite(v) for v in report["pretraining_nll"].values())
    assert set(report["pretraining_nll"]) == {"pretrained", "sft", "ppo", "ppo_ptx", "ppo_gold"}
    # The gold-reward run's rollouts are scored by the gold scorer: within [0, gold_scale].
    gold_scores = [v for _, v in report["curves"]["ppo_gold"]["rollout/score"]]
    assert all(0 <= v <= config.ppo.gold_scale for v in gold_scores)
    assert set(report["win_rate_over_sft"]) == {"ppo", "ppo_gold"}
    # The gold curves: SFT's greedy score on the same 8 prompts, then every iteration.
    sft_gold = report["gold_score"]["sft/train_templates"]
    for name in ("ppo", "ppo_ptx"):
        steps, gold = zip(*report["curves"][name]["gold"], strict=True)
        assert steps == (0, 1, 2) and gold[0] == pytest.approx(sft_gold)
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000  # four drawn panels, not a blank
    lines = experiment.summary_lines(report)
    assert len(lines) == 6 and "chance 50%" in lines[0] and "uniform 5.545" in lines[-1]
    assert set(report["gold_score_sampled"]) == {"sft", "ppo", "ppo_ptx", "ppo_gold"}
    # A rerun resumes every stage as finished: the gold points come from gold.jsonl, once each.
    again = experiment.run(config, tmp_path)
    assert again["curves"]["ppo"]["gold"] == report["curves"]["ppo"]["gold"]
