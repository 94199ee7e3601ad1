"""Full-size recipes a pod launches as they are: paper-size models on your own data, each with
its mesh. ``get_config(quick=True)`` substitutes tiny sizes (the tests train it on CPU); the
settings shared by every full-size model are here."""

from __future__ import annotations

import ml_collections

from jaxaigc.configs import fields


def full_size(config_class, preset: str, **changes) -> ml_collections.ConfigDict:
    """A preset's model section as a pod trains it: bf16 compute, scanned transformer layers with
    full remat (the decoder's UNet blocks keep their own ``unet_remat_policy``, none)."""
    model = config_class.from_name(preset, **changes)
    return fields.section(model.replace(dtype="bfloat16", scan_layers=True, remat_policy="full"))


def pod_mesh(config: ml_collections.ConfigDict) -> None:
    """FSDP over every device; convolution kernels split along their input channels too (a
    ResNet's or UNet's parameters are mostly convolutions, which the default rules leave whole
    on fsdp)."""
    config.mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1})
    config.mesh.rules = ml_collections.ConfigDict({"conv_in": "fsdp"})
