"""The CLIP training pipeline end to end on procedural scenes: the loss falls, on a ViT and on a
ResNet (whose BatchNorm statistics are model state), and on an 8-device mesh."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from jaxaigc.data.tokenizers import ClipTokenizer
from jaxaigc.pipelines import clip
from jaxaigc.train.loop import train
from jaxaigc.train.metrics import read_metrics

try:
    ClipTokenizer()
except FileNotFoundError as error:
    pytest.skip(f"no CLIP vocabulary: {error}", allow_module_level=True)


def _config(preset: str, steps: int, **changes):
    config = clip.get_config()
    model = clip.CLIPConfig.from_name(preset, context_length=24, **changes)
    config.model = ml_collections.ConfigDict(dataclasses.asdict(model))
    config.data.update(dict(shapes=512, emoji_repeats=0, fashion_mnist=False))
    config.train.update(dict(steps=steps, batch_size=32, log_every=5, checkpoint_every=1000))
    config.optim.warmup_steps = 5
    return config


@pytest.mark.parametrize(
    ("preset", "loss"), [("tiny-vit", "softmax"), ("tiny-rn", "softmax"), ("tiny-vit", "sigmoid")]
)
def test_contrastive_loss_falls(preset, loss, tmp_path):
    changes = (
        dict(logit_bias_init=-10.0, logit_scale_init=np.log(10.0)) if loss == "sigmoid" else {}
    )
    config = _config(preset, steps=30, **changes)
    config.loss = loss
    _, task, batches, _ = clip.build(config)
    state = train(task, batches, config, tmp_path)
    losses = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    if preset == "tiny-rn":
        stats = jax.tree.leaves(state.model_state["batch_stats"])
        assert stats and any(np.abs(np.asarray(s)).sum() > 0 for s in stats)


def test_unknown_loss_is_an_error():
    config = _config("tiny-vit", steps=1)
    config.loss = "triplet"
    with pytest.raises(ValueError, match="unknown contrastive loss 'triplet'"):
        clip.build(config)
    config.loss = "sigmoid"
    with pytest.raises(ValueError, match="logit_bias_init"):
        clip.build(config)
