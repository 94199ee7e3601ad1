"""unCLIP on shapes scenes: a diffusion prior and a diffusion decoder trained on the CLIP run's
features, judged text -> image beside DALL-E on the same test captions: the demo's fifth stage
(336 s in the whole demo, BUILD_NOTES "unCLIP").

Stages: ``clip`` (read: the CLIP whose features both stages train on), ``prior`` and ``decoder``
(trained here, in that order), ``dalle`` (read when it holds checkpoints, for the comparison).
"""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import fields
from jaxaigc.models.decoder import DecoderConfig
from jaxaigc.models.prior import PriorConfig
from jaxaigc.train.loop import default_train_config

# Shapes captions are at most 19 CLIP tokens with SOT and EOT.
TEXT_LEN = 24
# The decoder's caption encoder reads the CLIP tokenizer's ids (the captions as the CLIP stage
# tokenises them).
CLIP_VOCAB = 49408
# The model fields that only the CLIP decides. get_config leaves them unset, and the stages fill
# them in from the CLIP features (so they follow the CLIP run, whatever its size); a value set by
# hand is checked against the features instead.
CLIP_FIELDS = {"prior": ("embed_dim", "text_width"), "decoder": ("clip_dim", "image_size")}


def get_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.stages = ml_collections.ConfigDict(
        dict(clip="../clip", prior="prior", decoder="decoder", dalle="../dalle"), sort_keys=False
    )
    # The training scenes whose CLIP features both stages train on, encoded once, encode_batch
    # scenes per CLIP call.
    config.data = ml_collections.ConfigDict(dict(scenes=4000, seed=1, encode_batch=500))

    prior = default_train_config()
    prior.model = fields.preset_section(PriorConfig, "tiny", text_len=TEXT_LEN)
    fields.leave_unset(prior.model, CLIP_FIELDS["prior"], int)
    prior.optim.update(dict(peak_lr=1e-3, warmup_steps=50, b2=0.96, weight_decay=0.06))
    prior.train.update(dict(batch_size=64, steps=500, log_every=50, checkpoint_every=500))
    config.prior = prior

    decoder = default_train_config()
    # No caption pathway: the paper found it "offers little help" with binding, and here GLIDE's
    # text transformer (text_layers=2 on the captions' CLIP token ids, text_drop 0.5) drew the
    # same blobs after the demo's 500 updates, judge 17% (20% without it, on another run of the
    # demo's CLIP), and after 1,500 with EMA 0.995, judge 19%, shapes right 24% (BUILD_NOTES,
    # "unCLIP"). text_len and text_vocab are set, so that
    # --config.decoder.model.text_layers=N alone turns it on. Attention only at 8 px: at 16 px
    # (256 tokens) it made a CPU train step 1.7x slower (1.25 -> 0.75 s at batch 32, loaded
    # 2-core machine), and 8 px already sees the whole 32 px scene. v prediction: after 600
    # updates the round trip cos(CLIP(decode(z_i)), z_i) was 0.77-0.81 against eps's 0.09-0.28,
    # with black backgrounds and the scene's colours where eps left noise (BUILD_NOTES,
    # "Diffusion and unCLIP").
    decoder.model = fields.preset_section(
        DecoderConfig, "tiny", attention_resolutions=(8,), text_layers=0, text_len=TEXT_LEN,
        text_vocab=CLIP_VOCAB, prediction="v",
    )  # fmt: skip
    fields.leave_unset(decoder.model, CLIP_FIELDS["decoder"], int)
    # The loss's timestep weighting (objectives.diffusion.loss_weights): "none" or "min_snr".
    decoder.loss = ml_collections.ConfigDict(dict(weighting="none", min_snr_gamma=5.0))
    decoder.optim.update(dict(peak_lr=2e-3, warmup_steps=50))
    # 500 updates each: prior cos 0.946 (text baseline 0.876), round trip 0.880, judge 20%
    # (BUILD_NOTES); 3,000 decoder updates with EMA 0.995 reach 53.5% on a shapes-only CLIP.
    decoder.train.update(dict(batch_size=32, steps=500, log_every=50, checkpoint_every=500))
    config.decoder = decoder

    config.sample = ml_collections.ConfigDict(
        dict(
            prior_steps=64,  # paper: 64 strided DDIM steps
            prior_candidates=2,  # paper: best of 2 by z_i . z_t
            prior_guidance=1.0,
            # The v decoder after 600 updates (100 test scenes, round trip cos(CLIP(decode(z_i)),
            # z_i)): DDIM 25 steps 0.768 unguided, 0.805 at guidance 3; DDPM 100 steps at
            # guidance 3 0.814 for 3.4x the time. (An eps decoder needed DDPM's fresh noise.)
            decoder_method="ddim",
            decoder_steps=25,
            decoder_guidance=3.0,
            candidates=1,  # images per caption
        )
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            scenes=100,  # test scenes: the DALL-E run's first 100 test captions
            batch=100,
            grid_captions=10,
            seed=0,  # the DALL-E pairs' test stream (TokenPairsConfig.seed): the same captions
            # Decoder samplers method:steps:guidance, each through the whole pipeline on the
            # first sweep_scenes test scenes, e.g. "ddim:10:3,ddim:25:3,ddim:50:1,ddpm:100:3".
            sweep="",
            sweep_scenes=100,
            # Also judge the training scene whose z_i is nearest each test z_i: what z_i alone
            # identifies, a baseline for the decoder (re-encodes the training scenes).
            nearest_training_scene=False,
        )
    )
    if quick:
        config.data.scenes = 256
        prior.model.update(dict(width=32, layers=1, heads=2))
        # One UNet level (its middle block still attends): each level more doubled the compile
        # times of the decoder's init and train step (6 + 9 s -> 15 + 16 s on 2 cores).
        decoder.model.update(
            dict(model_channels=8, channel_mult=(1,), attention_resolutions=(), head_channels=8)
        )
        for stage, batch_size in ((prior, 16), (decoder, 8)):
            stage.optim.update(dict(peak_lr=3e-3, warmup_steps=5))
            stage.train.update(
                dict(batch_size=batch_size, steps=30, log_every=10, checkpoint_every=30)
            )
        config.sample.update(dict(prior_steps=8, decoder_steps=8))
        config.eval.update(dict(scenes=16, batch=16, grid_captions=4, sweep_scenes=8))
    return config
