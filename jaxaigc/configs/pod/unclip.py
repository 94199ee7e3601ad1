"""unCLIP at the paper's size (Ramesh et al. 2022, Table 3) on your own data: the 1B diffusion
prior on CLIP embeddings that clip-retrieval computed, and the 3.5B decoder on image shards with
those embeddings (training: :mod:`jaxaigc.systems.unclip_pod`). Train them with::

    clip-retrieval inference --input_format webdataset --input_dataset /data/{00000..00999}.tar \
        --clip_model ViT-L/14 --enable_metadata True --output_folder /data/emb   # and held out:
    clip-retrieval inference ... --input_dataset /data/val.tar --output_folder /data/val-emb
    jaxaigc convert clip ViT-L-14.pt runs/clip-vit-l14
    jaxaigc train unclip-prior-1b --workdir runs/prior --config.stages.clip=../clip-vit-l14 \
        --config.data.embeddings=/data/emb --config.data.eval_embeddings=/data/val-emb
    jaxaigc train unclip-decoder-3.5b --workdir runs/decoder \
        --config.data.source=webdataset:/data/{00000..00999}.tar \
        --config.data.embeddings=/data/emb --config.data.eval_source=webdataset:/data/val.tar \
        --config.data.eval_embeddings=/data/val-emb --config.stages.prior=../prior
    jaxaigc generate runs/decoder "a corgi playing a flame-throwing trumpet" --n 4

The prior conditions on the caption's per-token CLIP text features, which clip-retrieval does
not store: the step computes them from the caption's CLIP BPE tokens with the frozen text tower
of the CLIP that made the embeddings (``stages.clip``; ``clip`` is its architecture, by which
``jaxaigc plan`` sizes the step).
"""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import fields
from jaxaigc.configs.pod import full_size, pod_mesh
from jaxaigc.models.clip import CLIPConfig
from jaxaigc.models.decoder import DecoderConfig
from jaxaigc.models.prior import PriorConfig
from jaxaigc.train.loop import default_train_config

# The paper's iterations (Table 3).
PRIOR_STEPS, DECODER_STEPS = 600_000, 800_000


def _schedule(config: ml_collections.ConfigDict, *, steps: int, batch_size: int) -> None:
    config.train.update(
        dict(
            steps=steps,
            batch_size=batch_size,
            ema_decay=0.9999,  # paper, both stages
            log_every=100,
            checkpoint_every=2000,
        )
    )
    # Not given in the paper: 1% of the run.
    config.optim.warmup_steps = steps // 100


def get_prior_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    """The 1B prior (width 2048, 24 blocks) on ViT-L/14 embeddings, batch 4096."""
    config = default_train_config()
    config.model = full_size(PriorConfig, "paper-1b")
    config.clip = fields.preset_section(CLIPConfig, "ViT-L/14")
    config.stages = ml_collections.ConfigDict(dict(clip=""))
    # clip-retrieval output folders (comma-separated for several): img_emb/, text_emb/, metadata/.
    config.data = ml_collections.ConfigDict(dict(embeddings="", eval_embeddings=""))
    # Paper: AdamW lr 1.1e-4, beta2 0.96, eps 1e-6, weight decay 6e-2.
    config.optim.update(dict(peak_lr=1.1e-4, b2=0.96, eps=1e-6, weight_decay=6e-2))
    _schedule(config, steps=PRIOR_STEPS, batch_size=4096)
    # Paper: 64 strided DDIM steps, the better of 2 samples by z_i . z_t.
    config.sample = ml_collections.ConfigDict(
        dict(prior_steps=64, prior_candidates=2, prior_guidance=1.0)
    )
    config.eval = ml_collections.ConfigDict(dict(samples=4096, batch=512))
    pod_mesh(config)
    if quick:
        config.model.update(dict(embed_dim=64, text_len=16, text_width=32, width=32, layers=1,
                                 heads=2))  # fmt: skip
        config.clip = fields.preset_section(
            CLIPConfig, "tiny-vit", context_length=16, transformer_width=32, transformer_layers=1
        )
        config.train.update(dict(steps=4, batch_size=16, log_every=1, checkpoint_every=2))
        config.optim.warmup_steps = 1
        config.sample.prior_steps = 4
        config.eval.update(dict(samples=16, batch=8))
    return config


def get_decoder_config(*, quick: bool = False) -> ml_collections.ConfigDict:
    """The 3.5B decoder (GLIDE's 64 px UNet with its text transformer) on image shards and their
    ViT-L/14 image embeddings, batch 2048."""
    config = default_train_config()
    config.model = full_size(DecoderConfig, "paper-3.5b")
    # prior: the unclip-prior-1b run `jaxaigc generate` samples image embeddings from (training
    # does not read it; `jaxaigc generate DECODER --prior DIR` names another).
    config.stages = ml_collections.ConfigDict(dict(prior=""))
    # source: the images, webdataset:PATTERN (the shards clip-retrieval read); embeddings: its
    # output folders. The images join their embeddings by key.
    config.data = ml_collections.ConfigDict(
        dict(source="", embeddings="", eval_source="", eval_embeddings="")
    )
    # The loss's timestep weighting (objectives.diffusion.loss_weights): "none" or "min_snr".
    config.loss = ml_collections.ConfigDict(dict(weighting="none", min_snr_gamma=5.0))
    # Paper: AdamW lr 1.2e-4, beta2 0.999, eps 1e-8, no weight decay.
    config.optim.update(dict(peak_lr=1.2e-4, b2=0.999, eps=1e-8, weight_decay=0.0))
    _schedule(config, steps=DECODER_STEPS, batch_size=2048)
    # Paper: 250 sampling steps; GLIDE's guidance scale 3.
    config.sample = ml_collections.ConfigDict(
        dict(decoder_method="ddpm", decoder_steps=250, decoder_guidance=3.0)
    )
    # Held-out: the validation loss over `samples` images, `grid` of them decoded beside the real.
    config.eval = ml_collections.ConfigDict(dict(samples=1024, batch=64, grid=8, seed=0))
    pod_mesh(config)
    if quick:
        config.model.update(
            dict(image_size=16, model_channels=8, channel_mult=(1,), num_res_blocks=1,
                 attention_resolutions=(), head_channels=8, groups=8, clip_dim=64, text_len=16,
                 context_width=32, text_layers=1, text_heads=2)
        )  # fmt: skip
        config.train.update(dict(steps=4, batch_size=16, log_every=1, checkpoint_every=2))
        config.optim.warmup_steps = 1
        config.sample.decoder_steps = 4
        config.eval.update(dict(samples=16, batch=8, grid=4))
    return config
