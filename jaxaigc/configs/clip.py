"""A small CLIP trained contrastively on emoji, their names drawn in a second style and shapes
scenes, scored on transfer (BUILD_NOTES, "CLIP transfer": recipe Y2): the demo's second stage,
~4 minutes on 2 cores."""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import fields
from jaxaigc.models.clip import CLIPConfig
from jaxaigc.train.loop import default_train_config


def get_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    config = default_train_config()
    # A small ModifiedResNet image tower learns the emoji twice as fast per step as tiny-vit's and
    # transfers better to held-out names and OpenMoji's style. 24 tokens hold the longest caption
    # (19); a 64-wide text tower (at 128 its backward pass took most of a step) runs 2,200 steps
    # in the time 1,100 took.
    config.model = fields.preset_section(
        CLIPConfig, "tiny-rn", context_length=24, vision_width=16, transformer_width=64
    )
    config.loss = "softmax"  # or "sigmoid" (SigLIP; set model.logit_bias_init, e.g. -10)
    config.data = ml_collections.ConfigDict(
        dict(
            # Your own pairs instead of the embedded mix: "webdataset:/data/{00000..00099}.tar"
            # (img2dataset's shards) or "folder:captions.csv" (or .jsonl); see data/shards.py.
            source="",
            shapes=20_000,  # procedural scenes in the training mix
            emoji_repeats=16,  # the ~1,230 training emoji, repeated to weigh them up
            symbola_repeats=16,  # the same names drawn by Symbola (~960), a second style
            emojione_repeats=0,  # and by EmojiOne 2 (~980), a third, in colour
            # Off, so the Fashion-MNIST figure is zero-shot.
            fashion_mnist=False,
            data_dir=ml_collections.config_dict.placeholder(str),
            # image_text.CaptionTrueAugment on the emoji and Fashion-MNIST records (never on
            # shapes, whose captions name positions, sizes and colours)
            augment=ml_collections.ConfigDict(
                dict(
                    enabled=True,
                    crop_scale=0.5,
                    shrink=1.0,
                    flip=True,
                    greyscale=0.2,
                    style=0.0,
                    word_dropout=0.2,
                    gloss=0.0,  # WordNet definitions after names; no gain measured (BUILD_NOTES)
                )
            ),
            # Weight of a text-text InfoNCE on WordNet (noun, kind-of word) pairs whose word is
            # a training caption's, within text_pairs_depth hypernym steps ("eagle", "bird"):
            # what the captions never name, placed by the text tower near what they do. No gain
            # measured on the demo's data, at 1.35x the step time (BUILD_NOTES).
            text_pairs=0.0,
            text_pairs_depth=2,
        )
    )
    config.optim.update(dict(peak_lr=1e-3, weight_decay=0.1))
    # Held-out Noto top-5 10.9%, OpenMoji trained names 11.3% (seed 0); 224 s with evaluation.
    config.train.update(dict(batch_size=128, steps=2200, log_every=25, checkpoint_every=250))
    config.eval = ml_collections.ConfigDict(
        dict(
            fashion_mnist=10_000,  # test images classified
            shapes=1_000,  # test scenes for retrieval
            shape_scenes=2_000,  # test scenes whose one-object ones are classified
            batch_size=500,
            examples=16,  # held-out emoji shown with the model's guesses
        )
    )
    if quick:
        config.data.update(dict(shapes=2_000, emoji_repeats=1, symbola_repeats=1))
        config.train.update(dict(batch_size=32, steps=60, log_every=10, checkpoint_every=60))
        # Batches of 32, fewer rows than any evaluated set has: one compiled shape per encoder.
        config.eval.update(dict(fashion_mnist=500, shapes=200, shape_scenes=400, batch_size=32))
    return config
