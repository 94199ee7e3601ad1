"""InstructGPT from a converted GPT-2 on your own JSONL data, tiny sizes substituted: a random
GPT-2 run dir with a BPE tokenizer trained on the test's text, SFT -> RM (K-way rankings and
HH-RLHF pairs) -> PPO and PPO-ptx on 8 devices (FSDP), a crash after a PPO checkpoint resumed
bit-identically, the evaluator's report, and bad inputs named before anything compiles."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxaigc import pipelines, run
from jaxaigc.convert.checkpoints import write_run
from jaxaigc.data.tokenizers import Gpt2Tokenizer
from jaxaigc.models.gpt import GPT, GPTConfig
from jaxaigc.pipelines.language_model import LanguageModel
from jaxaigc.systems import instructgpt_pod as pod
from jaxaigc.train import checkpoint, loop
from jaxaigc.train.metrics import read_metrics
from jaxaigc.train.rollout import score_samples
from jaxaigc.train.state import init_state
from tests.helpers import assert_trees_equal, tiny_gpt2_bpe

RECIPE = "instructgpt-gpt2"
WORDS = (
    "apple",
    "pear",
    "plum",
    "fig",
    "lime",
    "kiwi",
    "grape",
    "melon",
    "peach",
    "mango",
    "lemon",
    "cherry",
    "olive",
    "onion",
    "leek",
    "kale",
    "bean",
    "corn",
    "rice",
    "oat",
    "wheat",
    "rye",
    "barley",
    "millet",
)
BASE = GPTConfig(vocab_size=320, context_length=64, width=32, layers=2, heads=2,
                 tie_embeddings=True)  # fmt: skip


def _ask(word: str) -> str:
    return f"\n\nHuman: Please say {word}.\n\nAssistant:"


def _jsonl(path, lines) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random tiny GPT-2 run with its BPE (EOS id 0, as the tokenizer gives it), and JSONL
    files of every kind: demonstrations (one bad line), K-way rankings, HH-RLHF pairs, prompts."""
    root = tmp_path_factory.mktemp("instructgpt_gpt2")
    n = len(WORDS)
    demos = [{"prompt": _ask(w), "response": f" {w.title()}!"} for w in WORDS]
    rankings = [
        {"prompt": _ask(w), "responses": [f" {WORDS[(i + 1) % n]}", f" {w.title()}!", " No."],
         "ranking": [1, 0, 2]}
        for i, w in enumerate(WORDS[:12])
    ]  # fmt: skip
    pairs = [
        {"chosen": _ask(w) + f" {w.title()}!", "rejected": _ask(w) + f" {WORDS[(i + 3) % n]}"}
        for i, w in enumerate(WORDS[12:])
    ]
    prompts = [{"prompt": _ask(w) if i % 2 else f"Say {w}:"} for i, w in enumerate(WORDS * 2)]
    files = {
        "demonstrations": _jsonl(root / "demos.jsonl", demos + [{"prompt": "no response"}]),
        "rankings": _jsonl(root / "rankings.jsonl", rankings),
        "pairs": _jsonl(root / "hh.jsonl", pairs),
        "prompts": _jsonl(root / "prompts.jsonl", prompts),
    }
    texts = [json.dumps(x) for x in demos + rankings + pairs + prompts]
    bpe = tiny_gpt2_bpe(texts, 300)
    params = GPT(BASE).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    write_run(root / "gpt2", "gpt2", BASE, {"params": nn.meta.unbox(params)}, source="test")
    Gpt2Tokenizer(bpe).save(root / "gpt2")  # as `jaxaigc convert gpt2` saves it
    return {"root": root, "files": files, "base_params": nn.meta.unbox(params)}


def _config(inputs) -> ml_collections.ConfigDict:
    config = run.get_config(RECIPE, quick=True)
    files = inputs["files"]
    config.data.update(
        demonstrations=files["demonstrations"],
        comparisons=f"{files['rankings']},{files['pairs']}",
        prompts=files["prompts"],
        eval_fraction=0.2,
    )
    config.stages.base = str(inputs["root"] / "gpt2")  # absolute: kept as it is
    # XLA:CPU deadlocks in a collective running the bf16, scanned, fully rematerialised RM step
    # with the YNNPACK fusions when it is read back from the persistent compilation cache, as the
    # resume below reads its step (experiments/repro/cpu_cached_collective_deadlock.py).
    config.model.remat_policy = "none"
    config.plain_ppo = False  # one PPO stage compiled (PPO's own config: a fast test below)
    # SFT and PPO at rates that move them in a few steps (PPO: 3 iterations, checkpointed at
    # the second), so that the report compares policies that differ.
    config.sft.update(steps=6, peak_lr=1e-2)
    config.ppo.update(episodes=3 * config.ppo.batch_size, peak_lr=1e-3)
    config.train.checkpoint_every = 2
    return config


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    """The recipe trained and evaluated as ``jaxaigc train instructgpt-gpt2`` runs it."""
    workdir = tmp_path_factory.mktemp("run")
    config = _config(inputs)
    return workdir, run.train_and_evaluate(RECIPE, config, workdir), config


def _ppo_variables(run_dir) -> dict:
    """``{"params": {"policy", "value"}, "frozen", "kl"}`` of a PPO stage's last checkpoint."""

    def init_fn(run_config):
        return pod.ppo_task(ml_collections.ConfigDict(run_config)).init

    return checkpoint.load_trained(run_dir, init_fn)[1]


@pytest.mark.slow
def test_every_stage_trains_from_the_converted_gpt2(trained, inputs):
    workdir, _, config = trained
    sft = read_metrics(workdir / "sft")
    assert sft[-1]["train/loss"] < 0.85 * sft[0]["train/loss"], sft
    rm = read_metrics(workdir / "rm")
    assert len(rm) == 2 and all(np.isfinite(r["train/ranking_loss"]) for r in rm)
    records = read_metrics(workdir / "ppo_ptx")
    assert [r["step"] for r in records] == [1, 2, 3] and "train/ptx_nll" in records[-1]
    assert 0 < records[-1]["rollout/length"] <= config.ppo.algorithm.response_length
    assert not (workdir / "ppo").exists()
    # The reference policy PPO keeps frozen is the SFT stage's result, from the base's weights.
    variables = _ppo_variables(workdir / "ppo_ptx")
    _, sft_variables, _ = checkpoint.load_trained(
        workdir / "sft", lambda c: pod.make_sft_task(ml_collections.ConfigDict(c))[1].init
    )
    stacked = pod.layer_layout(sft_variables["params"], scan_layers=False)
    assert_trees_equal(pod.layer_layout(variables["frozen"]["reference"], scan_layers=False),
                       stacked)  # fmt: skip
    moved = stacked["token_embedding"] - inputs["base_params"]["token_embedding"]
    assert 0 < float(np.abs(moved).max()) < 0.1  # fine-tuned from the base, not re-initialised


@pytest.mark.slow
def test_the_reward_model_ppo_used_is_normalised_on_sft_samples(trained):
    workdir, _, config = trained
    config, tokenizer = pod.resolve(config, workdir)
    n = config.rm.normalize_examples
    prompt, valid = pod.encoder(config, tokenizer).prompts(pod.read_data(config).prompts[:n])
    _, sft, _ = checkpoint.load_trained(
        workdir / "sft", lambda c: pod.make_sft_task(ml_collections.ConfigDict(c))[1].init
    )
    params = {"policy": sft["params"], "reward": pod.load_reward_model(config, workdir)}
    models = (pod.policy_config(config), pod.reward_config(config), pod.ppo_config(config))
    # The samples the normaliser was fitted on: the same prompts and row keys (one batch).
    rng = jax.random.fold_in(jax.random.key(config.seed), 0)
    scores = score_samples(*models, params=params, prompt=prompt, prompt_valid=valid, rng=rng)
    scores = np.asarray(scores["raw_score"], np.float64)
    assert len(scores) == n == 8
    # To bf16's rounding of the folded head (other samples' mean would be ~N(0, 0.35)).
    np.testing.assert_allclose([scores.mean(), scores.std()], [0.0, 1.0], atol=0.05)


@pytest.mark.slow
def test_a_crash_after_a_ppo_checkpoint_resumes_bit_identically(trained, tmp_path, monkeypatch):
    straight, _, config = trained
    for stage in ("sft", "rm"):  # the finished stages of the straight run: only ppo_ptx trains
        config.stages[stage] = str(straight / stage)

    def crash(step, state, metrics):
        if step == 2:  # after step 2's checkpoint
            raise KeyboardInterrupt

    train = loop.train
    with monkeypatch.context() as patch:
        patch.setattr(loop, "train", lambda *a, hooks=(), **k: train(*a, hooks=[crash], **k))
        with pytest.raises(KeyboardInterrupt):
            pod.train(config, tmp_path)
    assert not (tmp_path / "ppo").exists()
    pod.train(config, tmp_path)
    resumed, straight = (_ppo_variables(d / "ppo_ptx") for d in (tmp_path, straight))
    assert_trees_equal(resumed, straight)


@pytest.mark.slow
def test_the_report_has_its_figures(trained):
    workdir, report, config = trained
    figures = {f["name"].split(",")[0]: f for f in report["figures"]}
    accuracy = figures["reward model pairwise accuracy"]
    assert 0 <= accuracy["value"] <= 1 and accuracy["baseline"] == 0.5
    assert report["reward_model"]["pairs"] > report["reward_model"]["comparisons"] > 0
    assert report["held_out_prompts"] == config.eval.prompts == 8  # of 10 held out (20% of 48)
    for label in ("PPO-ptx",):
        wins = figures[f"{label} wins over SFT by the reward model"]
        assert 0 <= wins["value"] <= 1 and wins["baseline"] == 0.5
        score = figures[f"{label} mean reward-model score"]
        assert score["baseline"] == report["rm_score"]["sft"] != score["value"]
        assert figures[f"KL({label} || SFT) per response"]["value"] != 0
        assert report["tie_rate_with_sft"]["ppo_ptx"] < 1  # some responses differ from SFT's
    assert report["skipped_lines"]["demonstrations"] == 1
    example = report["examples"][0]
    assert set(example) == {"prompt", "sft", "ppo_ptx"}
    assert isinstance(example["ppo_ptx"]["response"], str)
    assert json.loads((workdir / "report.json").read_text())["system"] == RECIPE


@pytest.mark.slow
def test_the_policies_answer_through_the_pipeline(trained):
    workdir, _, _ = trained
    policy = pipelines.load(workdir)  # PPO-ptx, with the base GPT-2's tokenizer
    assert isinstance(policy, LanguageModel)
    answers = policy.respond([_ask("cat"), _ask("dog")], max_tokens=3)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    sft = pipelines.load_policy(workdir, "sft")
    assert jax.tree.structure(sft.params) == jax.tree.structure(policy.params)
    with pytest.raises(ValueError, match="trains no policy"):
        pipelines.load_policy(workdir, "ppo_gold")


def test_the_model_and_its_ids_follow_the_base(inputs):
    config, tokenizer = pod.resolve(_config(inputs), inputs["root"])
    assert config.model.vocab_size == 320 and config.model.context_length == 64
    assert config.model.dtype == "bfloat16" and config.model.scan_layers  # the recipe's compute
    assert config.ppo.algorithm.eos_id == tokenizer.eos_id == 0  # the tokenizer's, not 50256
    demo = pod.read_data(config).demonstrations[0]
    rows = pod.encoder(config, tokenizer).demonstrations([demo])
    response = rows["tokens"][0][rows["response_mask"][0]]
    assert tokenizer.decode(response.tolist()) == demo.response and response[-1] == 0


def test_stage_configs_follow_the_paper():
    config = run.get_config(RECIPE)
    sft = pod.stage_config(config, "sft", 13_000)  # the paper's 13k demonstrations
    assert sft.train.steps == 6_500 and sft.train.batch_size == 32  # 16 epochs
    assert sft.optim.peak_lr == 9.65e-6 and sft.model.dropout_rate == 0.2
    assert (sft.optim.warmup_steps, sft.optim.end_lr_ratio, sft.optim.b2) == (0, 0.1, 0.95)
    rm = pod.stage_config(config, "rm", 33_000)
    assert rm.train.steps == 516 and rm.model.dropout_rate == 0.0  # one epoch of 64 prompts
    ppo, ptx = (pod.stage_config(config, s) for s in ("ppo", "ppo_ptx"))
    assert ppo.train.steps == ptx.train.steps == 500  # 256k episodes of 512
    assert (ppo.ppo.algorithm.gamma_ptx, ptx.ppo.algorithm.gamma_ptx) == (0.0, 27.8)
    assert ptx.optim.end_lr_ratio == 1.0 and ptx.optim.warmup_steps == 80  # constant after 10
    assert pod.ppo_stages(config) == ("ppo", "ppo_ptx")
    config.ppo.episodes = 100
    with pytest.raises(ValueError, match="ppo.episodes make no step of config.ppo.batch_size=512"):
        pod.stage_config(config, "ppo_ptx")
    with pytest.raises(ValueError, match="unknown stage 'dpo'"):
        pod.stage_config(config, "dpo")


def test_block_layouts_round_trip(inputs):
    params = inputs["base_params"]
    stacked = pod.layer_layout(params, scan_layers=True)
    assert stacked["transformer"]["resblocks"]["ln_1"]["scale"].shape == (2, 32)
    assert_trees_equal(pod.layer_layout(stacked, scan_layers=False), params)


def test_the_steps_compile_on_abstract_shapes():
    """What `jaxaigc plan` needs: each stage's task and one example's shapes, no data read."""
    config = run.get_config(RECIPE, quick=True)
    for stage, (make, spec) in {
        "sft": (pod.make_sft_task, pod.sft_batch_spec),
        "rm": (pod.make_rm_task, pod.rm_batch_spec),
    }.items():
        _, task = make(pod.stage_config(config, stage, 16))
        params = jax.eval_shape(task.init, jax.random.key(0))["params"]
        batch = {k: jax.ShapeDtypeStruct((2, *s), d) for k, (s, d) in spec(config).items()}
        loss, _ = jax.eval_shape(task.loss_fn, nn.meta.unbox(params), batch, jax.random.key(0))
        assert loss.shape == ()
    stage = pod.stage_config(config, "ppo_ptx")
    task = pod.ppo_task(stage)
    tx, schedule = loop.optimizer(task, stage)
    state = jax.eval_shape(
        lambda k: nn.meta.unbox(init_state(task.init, tx, k, use_ema=False)), jax.random.key(0)
    )
    step = loop.step_function(task, stage, tx, schedule, jax.random.key(1))
    spec = pod.ppo_batch_spec(config)
    batch = {k: jax.ShapeDtypeStruct((16, *s), d) for k, (s, d) in spec.items()}
    _, metrics = jax.eval_shape(step, state, batch)
    assert "train/ptx_nll" in metrics and "rollout/kl" in metrics


BAD_INPUTS = {
    "no prompts": (
        lambda c, tmp: c.data.update(prompts=""),
        ValueError, r"config.data.prompts is empty: set it, e.g. /data/rl/",
    ),
    "no base": (
        lambda c, tmp: c.stages.update(base=""),
        ValueError, "config.stages.base is empty.*jaxaigc convert gpt2",
    ),
    "a missing file": (
        lambda c, tmp: c.data.update(comparisons=str(tmp / "missing.jsonl")),
        FileNotFoundError, "missing.jsonl",
    ),
    "a file without a usable line": (
        lambda c, tmp: c.data.update(
            demonstrations=_jsonl(tmp / "bad.jsonl", [{"prompt": "no response"}])
        ),
        ValueError, r"bad.jsonl holds no usable demonstration line \(.*:1: no 'response'",
    ),
    "too many responses": (
        lambda c, tmp: c.data.update(max_k=2),
        ValueError, r"rankings.jsonl:1: 3 responses; data.max_k is 2",
    ),
    "nothing held out": (
        lambda c, tmp: c.data.update(eval_fraction=0.0),
        ValueError, "no held-out comparisons to evaluate on: set config.data.eval_comparisons",
    ),
    "too long": (
        lambda c, tmp: c.data.update(prompt_length=60),
        ValueError, r"prompt_length 60 \+ the response length 16 .* context of 64 tokens",
    ),
    "an unknown normaliser": (
        lambda c, tmp: c.rm.update(normalize_on="policy"),
        ValueError, r"config.rm.normalize_on='policy'; use one of \('sft_samples'",
    ),
    "too few prompts": (
        lambda c, tmp: c.ppo.update(batch_size=64),
        ValueError, "38 training prompts, fewer than one batch of config.ppo.batch_size=64",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_named_before_anything_compiles(case, inputs, tmp_path):
    change, error, message = BAD_INPUTS[case]
    config = _config(inputs)
    change(config, tmp_path)
    with pytest.raises(error, match=message):
        pod.train(config, tmp_path)
    assert not list(tmp_path.glob("*/checkpoints"))
