"""The full-size DALL-E (Ramesh et al. 2021): the 12B transformer on your (caption, image) shards,
the images tokenised during training by a converted OpenAI dVAE (256 px -> 32 x 32 tokens of
8,192). Train it with::

    jaxaigc convert dvae encoder.pkl runs/dvae --trust-pickle   # decoder.pkl beside it
    jaxaigc train dalle-12b --workdir runs/dalle-12b \\
        --config.data.source=webdataset:/data/{00000..01023}.tar --config.stages.dvae=../dvae
"""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import fields
from jaxaigc.configs.pod import full_size, pod_mesh
from jaxaigc.models.dalle import DALLEConfig
from jaxaigc.models.dvae import PRESETS as DVAE_PRESETS
from jaxaigc.models.dvae import DVAEConfig
from jaxaigc.train.loop import default_train_config

CLIP_BPE_IDS = 49_408  # ClipTokenizer().vocab_size (build checks it), its last id EOT


def get_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    config = default_train_config()
    # Read, not trained here: the converted dVAE (`jaxaigc convert dvae`) whose encoder tokenises
    # each batch and whose decoder draws the samples; optionally a CLIP run (`jaxaigc convert
    # clip`) that reranks the evaluation's samples. Empty: unset (dvae is required).
    config.stages = ml_collections.ConfigDict(dict(dvae="", clip=""), sort_keys=False)
    # The frozen dVAE's architecture (OpenAI's release); the run in stages.dvae must have it.
    config.dvae = fields.section(DVAE_PRESETS["dall-e"])
    # Captions: CLIP's BPE (ClipTokenizer: SOT, ids, EOT, then EOT as the padding, so text_vocab
    # is the tokenizer's 49,408); the paper trained its own BPE of 16,384 tokens on lowercased
    # captions. As the paper: 256 caption tokens, 32 x 32 image tokens of 8,192.
    config.model = full_size(
        DALLEConfig, "paper-12b", text_vocab=CLIP_BPE_IDS, pad_id=CLIP_BPE_IDS - 1
    )
    pod_mesh(config)
    config.data = ml_collections.ConfigDict(
        dict(
            # "webdataset:/data/{00000..01023}.tar" or "folder:/data/captions.csv" (shards.py).
            source="",
            eval_source="",  # held-out pairs of the same kinds; empty: the evaluation reads source
            # Shorter side resized to this, then the centre square: the dVAE's input side.
            image_size=256,
        )
    )
    # Paper App. B.2: AdamW (0.9, 0.96), eps 1e-8, weight decay 4.5e-2, gradients clipped to norm
    # 4, the rate warmed up to 4.5e-4 over 5,000 updates. The paper then halved it by hand at each
    # plateau, five times, ending 32 times lower; a cosine to the same end replaces the judgement.
    config.optim.update(
        dict(
            peak_lr=4.5e-4,
            warmup_steps=5_000,
            end_lr_ratio=1 / 32,
            b1=0.9,
            b2=0.96,
            eps=1e-8,
            weight_decay=4.5e-2,
            clip_norm=4.0,
        )
    )
    # Batch 1,024 for 430,000 updates (paper App. B.2).
    config.train.update(dict(steps=430_000, batch_size=1024, log_every=100, checkpoint_every=1_000))
    config.sample = ml_collections.ConfigDict(
        dict(candidates=8, temperature=1.0, top_k=0, top_p=1.0)
    )
    config.eval = ml_collections.ConfigDict(
        dict(
            pairs=2048,  # the first pairs of data.eval_source whose NLL is measured
            batch_size=1024,  # global; the data-parallel size must divide it
            grid_captions=8,  # of those pairs, sampled config.sample.candidates times each
        )
    )
    if quick:  # tiny sizes: a 16 px image is a 4 x 4 grid of a 64-code dVAE
        config.dvae = fields.section(
            DVAEConfig(n_hid=8, n_blk_per_group=1, group_count=3, vocab_size=64, n_init=8)
        )
        config.model.update(
            dict(text_len=12, image_side=4, image_vocab=64, width=32, layers=2, heads=2)
        )
        config.data.image_size = 16
        config.optim.warmup_steps = 2
        config.train.update(dict(steps=4, batch_size=8, log_every=1, checkpoint_every=2))
        config.sample.candidates = 2
        config.eval.update(dict(pairs=12, batch_size=8, grid_captions=2))
    return config
