"""CLIP training on procedural scenes: the loss falls, on a ViT and on a ResNet (whose BatchNorm
statistics are model state, read back with the EMA weights); the recipe's loss options."""

import jax
import numpy as np
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from jaxaigc import parallel
from jaxaigc.configs import clip as clip_config
from jaxaigc.configs import fields
from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.models.clip import LOGIT_SCALE_RANGE, CLIPConfig
from jaxaigc.systems import clip
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics
from jaxaigc.train.state import create_sharded_state
from jaxaigc.train.step import make_train_step
from tests.helpers import assert_trees_equal

try:
    ClipTokenizer()
except FileNotFoundError as error:
    pytest.skip(f"no CLIP vocabulary: {error}", allow_module_level=True)


def _config(preset: str, steps: int, **changes):
    config = clip_config.get_config()
    config.model = fields.preset_section(CLIPConfig, preset, context_length=24, **changes)
    config.data.update(dict(shapes=512, emoji_repeats=0, symbola_repeats=0))
    config.train.update(dict(steps=steps, batch_size=32, log_every=5, checkpoint_every=1000))
    config.optim.warmup_steps = 5
    return config


# The softmax loss on the ResNet (with an EMA and BatchNorm statistics), SigLIP's on the ViT.
@pytest.mark.parametrize(("preset", "loss"), [("tiny-rn", "softmax"), ("tiny-vit", "sigmoid")])
def test_contrastive_loss_falls(preset, loss, tmp_path):
    changes = (
        dict(logit_bias_init=-10.0, logit_scale_init=np.log(10.0)) if loss == "sigmoid" else {}
    )
    config = _config(preset, steps=30, **changes)
    config.loss = loss
    config.train.ema_decay = 0.9 if preset == "tiny-rn" else 0.0
    _, task, batches, _ = clip.build(config)
    state = train(task, batches, config, tmp_path)
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    if preset == "tiny-rn":
        stats = jax.tree.leaves(state.model_state["batch_stats"])
        assert stats and any(np.abs(np.asarray(s)).sum() > 0 for s in stats)
        # The run kept an EMA: the loader gives its weights with its BatchNorm statistics.
        model, variables, step = clip.load_trained(tmp_path)
        assert step == 30 and model.config == fields.to_dataclass(CLIPConfig, config.model)
        assert_trees_equal(variables, jax.device_get(state.eval_variables))


def test_unknown_loss_is_an_error():
    config = _config("tiny-vit", steps=1)
    config.loss = "triplet"
    with pytest.raises(ValueError, match="unknown contrastive loss 'triplet'"):
        clip.build(config)
    config.loss = "sigmoid"
    with pytest.raises(ValueError, match="logit_bias_init"):
        clip.build(config)


def test_the_siglip_bias_is_settable_from_the_command_line():
    argv = ["prog", "--config.loss=sigmoid", "--config.model.logit_bias_init=-10"]
    values = flags.FlagValues()
    config_flags.DEFINE_config_dict(
        "config", clip_config.get_config(), flag_values=values, sys_argv=argv
    )
    values(argv)
    assert fields.to_dataclass(CLIPConfig, values.config.model).logit_bias_init == -10.0
    default = clip_config.get_config().model
    assert fields.to_dataclass(CLIPConfig, default).logit_bias_init is None  # OpenAI's: no bias


def test_logit_scale_parameter_stays_in_range_and_the_model_uses_the_trained_scale():
    """Huge SGD steps throw the temperature out of [0, ln 100]; the step clamps the parameter,
    and the model's logits are the ones the loss was computed from."""
    config = _config("tiny-vit", steps=1, logit_scale_init=LOGIT_SCALE_RANGE[1] - 1e-3)
    model, task, batches, _ = clip.build(config)
    tx = optax.sgd(1e4)
    mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    state, _, _ = create_sharded_state(
        task.init, tx, jax.random.key(0), mesh, parallel.make_rules()
    )
    step = jax.jit(
        make_train_step(
            task.loss_fn,
            tx,
            rng=jax.random.key(1),
            has_model_state=True,
            constrain_params=task.constrain_params,
        )
    )
    batch = next(batches)
    scales = []
    for _ in range(3):
        state, _ = step(state, batch)
        scales.append(float(state.params["logit_scale"]))
    assert all(LOGIT_SCALE_RANGE[0] <= s <= LOGIT_SCALE_RANGE[1] for s in scales), scales
    assert scales[0] != pytest.approx(LOGIT_SCALE_RANGE[1] - 1e-3)  # it moved, to a bound
    loss, _ = task.loss_fn(state.params, state.model_state, batch, jax.random.key(2))
    logits, _ = model.apply({"params": state.params}, batch["image"], batch["tokens"])
    labels = np.arange(len(logits))
    ce = optax.softmax_cross_entropy_with_integer_labels
    expected = (ce(logits, labels).mean() + ce(logits.T, labels).mean()) / 2
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
