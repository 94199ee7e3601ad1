"""A diffusion upsampler (Ramesh et al. 2022, Sec. 2.1: two upsamplers, 64 -> 256 -> 1024 px;
Nichol et al. 2021, GLIDE's upsampler): an ADM UNet (:mod:`jaxaigc.nn.unet`) that denoises a
high-resolution image given the low-resolution one, resized to the same size and concatenated
on the channels, and the timestep; no caption and no CLIP embedding.

The resize is the caller's, so that it is the one the weights were trained with: Kakao Brain's
Karlo (diffusers' ``UNet2DModel``, its ``super_res_first`` / ``super_res_last``) upsamples with
PyTorch's bicubic interpolation (``align_corners=False``), whose kernel (a = -0.75) is not
``jax.image.resize``'s (a = -0.5). Karlo's upsampler has no attention, adds the timestep embedding
to its residual blocks (``scale_shift`` False) and predicts eps with fixed variances.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.diffusion import VARIANCES, Diffusion, cosine_betas
from jaxaigc.diffusion.schedules import check_prediction
from jaxaigc.models.decoder import check_unet_fields, config_unet
from jaxaigc.models.prior import check_width
from jaxaigc.nn import dense
from jaxaigc.nn.transformer import check_remat_policy
from jaxaigc.nn.unet import timestep_embedding

# name: (image_size, low_res_size, model_channels, channel_mult, num_res_blocks,
#        attention_resolutions, scale_shift, middle_attention)
PRESETS: dict[str, tuple] = {
    # Karlo's 64 -> 256 px upsampler (kakaobrain/karlo-v1-alpha, super_res_first/config.json and
    # super_res_last/config.json, as diffusers' scripts/convert_kakao_brain_unclip_to_diffusers.py
    # writes them): sample_size 256, block_out_channels (320, 640, 960, 1280), layers_per_block
    # 3, ResnetDownsample / ResnetUpsample blocks only, add_attention False, in_channels 6
    # (noised + resized low-res), out_channels 3, resnet_time_scale_shift "default" (added).
    "karlo-super-res": (256, 64, 320, (1, 2, 3, 4), 3, (), False, False),
}
_PRESET_FIELDS = (
    "image_size", "low_res_size", "model_channels", "channel_mult", "num_res_blocks",
    "attention_resolutions", "scale_shift", "middle_attention",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpsamplerConfig:
    image_size: int
    low_res_size: int  # the image it upsamples (the caller resizes it to image_size)
    in_channels: int = 3
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...] = ()  # feature-map sides (px) that get attention
    head_channels: int = 64
    groups: int = 32  # GroupNorm groups
    resblock_updown: bool = True
    scale_shift: bool = True  # False: the timestep embedding is added (ADM's default)
    middle_attention: bool = True
    dropout_rate: float = 0.0
    variance: str = "fixed_small"
    prediction: str = "eps"
    num_timesteps: int = 1000
    dtype: str = "float32"  # compute dtype; parameters stay float32
    unet_remat_policy: str = "none"

    def __post_init__(self):
        check_unet_fields(self)
        if not 0 < self.low_res_size <= self.image_size:
            raise ValueError(
                f"low_res_size {self.low_res_size} is not in (0, image_size {self.image_size}]"
            )
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; use one of {VARIANCES}")
        check_prediction(self.prediction)
        check_remat_policy(self.unet_remat_policy, "unet_remat_policy")

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.variance == "learned_range" else 1)

    def diffusion(self) -> Diffusion:
        return Diffusion(cosine_betas(self.num_timesteps))

    @classmethod
    def from_name(cls, name: str, **changes) -> UpsamplerConfig:
        """A preset (``"karlo-super-res"``) with ``changes`` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown upsampler model {name!r}; known: {list(PRESETS)}")
        return cls(**{**dict(zip(_PRESET_FIELDS, PRESETS[name], strict=True)), **changes})

    def replace(self, **changes) -> UpsamplerConfig:
        return dataclasses.replace(self, **changes)


class Upsampler(nn.Module):
    """x [b, r, r, in_channels] (the noised image), t int [b] (model timesteps), low_res
    [b, r, r, in_channels] (the low-resolution image resized to r, in [-1, 1]) -> eps / v / x0
    (and variance channels) float32 [b, r, r, out_channels]; ``train=True`` applies dropout."""

    config: UpsamplerConfig

    @nn.compact
    def __call__(
        self, x: jax.Array, t: jax.Array, low_res: jax.Array, *, train: bool = False
    ) -> jax.Array:
        cfg = self.config
        check_width("x", x, cfg.in_channels, "in_channels")
        if low_res.shape != x.shape:
            raise ValueError(
                f"low_res has shape {low_res.shape}, x {x.shape}: resize the low-resolution "
                "image to x's size first (the resize the weights were trained with)"
            )
        dtype = jnp.dtype(cfg.dtype)
        time_dim = 4 * cfg.model_channels
        emb = timestep_embedding(t, cfg.model_channels).astype(dtype)
        emb = dense(time_dim, ("embed", "mlp"), dtype=dtype, name="time_fc")(emb)
        emb = dense(time_dim, ("mlp", "embed"), dtype=dtype, name="time_proj")(nn.silu(emb))
        unet = config_unet(
            cfg, train=train, scale_shift=cfg.scale_shift, middle_attention=cfg.middle_attention
        )
        out = unet(jnp.concatenate([x, low_res], axis=-1), emb)
        return out.astype(jnp.float32)
