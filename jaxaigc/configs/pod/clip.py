"""CLIP (Radford et al. 2021) and SigLIP (Zhai et al. 2023) at full size on your image-text pairs:
ViT-B/32 or ViT-B/16, global batch 32,768 with the batch-sharded loss, FSDP over every device.

Launch (one process per host; JAX finds the others on a TPU pod; the workdir a filesystem every
host mounts, the data anywhere ``etils.epath`` reads)::

  jaxaigc train clip-vit-b16 --workdir /mnt/shared/runs/clip-b16 \\
    --config.data.source='webdataset:gs://BUCKET/laion/{00000..41407}.tar' \\
    --config.data.eval_source='webdataset:gs://BUCKET/coco-val/{00000..00004}.tar'
"""

from __future__ import annotations

import math

import ml_collections

from jaxaigc.configs.pod import full_size, pod_mesh
from jaxaigc.models.clip import CLIPConfig
from jaxaigc.train.loop import default_train_config

# 32 epochs of the paper's 400M pairs at 32,768 a batch.
PAPER_STEPS = 32 * 400_000_000 // 32_768


def get_config(
    *, quick: bool = False, model: str = "ViT-B/32", loss: str = "softmax"
) -> ml_collections.ConfigDict:
    """``model`` a CLIP preset; ``loss`` "softmax" (CLIP's InfoNCE) or "sigmoid" (SigLIP)."""
    config = default_train_config()
    sigmoid = loss == "sigmoid"
    # SigLIP's initial temperature and bias: t' = ln 10, b = -10 (Zhai et al. 2023, Sec. 3.2).
    init = dict(logit_scale_init=math.log(10.0), logit_bias_init=-10.0) if sigmoid else {}
    config.model = full_size(CLIPConfig, model if not quick else "tiny-vit", **init)
    config.loss = loss
    config.data = ml_collections.ConfigDict(
        dict(
            # Training pairs: webdataset:PATTERN, folder:CAPTIONS.csv|jsonl or tfds:NAME:SPLIT?..
            # (data/shards.py); a random crop of the resized image is the only augmentation.
            source="",
            eval_source="",  # held-out pairs for retrieval (e.g. COCO's 5k test images)
            text_pairs=0.0,  # the WordNet text-text loss of the small recipe: off
        )
    )
    if sigmoid:  # Zhai et al. 2023, Sec. 4: from scratch at lr 1e-3, wd 1e-4, Adam b2 0.95
        config.optim.update(dict(peak_lr=1e-3, weight_decay=1e-4, b2=0.95, eps=1e-8))
    else:  # Radford et al. 2021, Table 20 (ViT-B): lr 5e-4, wd 0.2, Adam (0.9, 0.98), eps 1e-6
        config.optim.update(dict(peak_lr=5e-4, weight_decay=0.2, b2=0.98, eps=1e-6))
    # Cosine decay to 0 after 2,000 warmup steps; the paper clips no gradient.
    config.optim.update(dict(warmup_steps=2000, end_lr_ratio=0.0, clip_norm=0.0))
    config.train.update(
        dict(batch_size=32_768, steps=PAPER_STEPS, log_every=100, checkpoint_every=2000)
    )
    config.eval = ml_collections.ConfigDict(dict(pairs=5000, batch_size=1024))
    pod_mesh(config)
    if quick:
        config.model.context_length = 24
        config.optim.warmup_steps = 2
        config.train.update(dict(batch_size=16, steps=4, log_every=1, checkpoint_every=2))
        config.eval.update(dict(pairs=32, batch_size=16))
    return config
