"""The discrete VAE of DALL-E (Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation"), NHWC.

Layer for layer the encoder and decoder of OpenAI's ``dall_e`` package (so its released weights
convert exactly, see :mod:`jaxaigc.convert.dvae`): a 256 px image becomes a 32 x 32 grid of tokens
from an 8192-entry vocabulary, and a grid of (one-hot or relaxed) codes decodes to the parameters of
a per-pixel logit-Laplace distribution (paper Sec. 2.1 and App. A.3).

Variables of one dVAE are ``{"encoder": {"params": ...}, "decoder": {"params": ...}}``: each half
applies on its own, ``Encoder(config).apply(variables["encoder"], map_pixels(images))``. A training
state holds the same arrays as ``params = {"encoder": ..., "decoder": ...}``.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxaigc.nn.conv import Conv2d, max_pool2d, upsample_nearest2d

# Pixels are squeezed into (eps, 1 - eps) so the logit-Laplace density stays finite (App. A.3).
LOGIT_LAPLACE_EPS = 0.1


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    n_hid: int = 256  # width of the first encoder / last decoder group; each group doubles it
    n_blk_per_group: int = 2
    group_count: int = 4  # the grid is 2 ** (group_count - 1) times smaller than the image
    vocab_size: int = 8192
    n_init: int = 128  # width of the decoder's input conv, the codebook of the one-hot codes
    input_channels: int = 3
    output_channels: int = 3  # image channels; the decoder emits twice as many (mu and ln b)
    dtype: str = "float32"  # compute dtype of the residual groups; parameters stay float32

    def replace(self, **changes) -> DVAEConfig:
        return dataclasses.replace(self, **changes)

    @property
    def downsample(self) -> int:
        """Image side / token-grid side."""
        return 2 ** (self.group_count - 1)

    @property
    def post_gain(self) -> float:
        # Scales every residual branch by 1 / L^2 (L = residual blocks in the network) so the
        # untrained network starts near the identity path.
        return 1.0 / (self.group_count * self.n_blk_per_group) ** 2


PRESETS: dict[str, DVAEConfig] = {
    "dall-e": DVAEConfig(),  # the released 256 px model: 32 x 32 tokens, vocab 8192
    # For the tests and CPU experiments: 64 px images -> 8 x 8 tokens, vocab 512.
    "tiny": DVAEConfig(n_hid=32, n_blk_per_group=1, vocab_size=512, n_init=32),
}


class ResBlock(nn.Module):
    """``id_path(x) + post_gain * res_path(x)``; res_path is four ReLU-conv pairs with the given
    kernel sizes, hidden width ``features // 4``; id_path is a 1x1 conv only where the width
    changes."""

    features: int
    kernel_sizes: tuple[int, int, int, int]
    post_gain: float
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        skip = x
        if x.shape[-1] != self.features:
            skip = Conv2d(self.features, 1, dtype=self.dtype, name="id_path")(x)
        h = x
        last = len(self.kernel_sizes) - 1
        for i, k in enumerate(self.kernel_sizes):
            width = self.features if i == last else self.features // 4
            h = Conv2d(width, k, dtype=self.dtype, name=f"conv_{i + 1}")(nn.relu(h))
        return skip + self.post_gain * h


def _group_boundary(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, ("batch", "height", "width", None))


class Encoder(nn.Module):
    """Mapped pixels [b, H, W, in] -> token logits float32 [b, H / d, W / d, vocab], with
    d = ``config.downsample``. Group widths are 1, 2, 4, 8 x n_hid, 2x2 max pools between groups."""

    config: DVAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        if x.ndim != 4 or x.shape[-1] != cfg.input_channels:
            raise ValueError(
                f"expected NHWC images with {cfg.input_channels} channels, got shape {x.shape}"
            )
        dtype = jnp.dtype(cfg.dtype)
        x = Conv2d(cfg.n_hid, 7, dtype=dtype, name="input")(x)
        for g in range(cfg.group_count):
            for i in range(cfg.n_blk_per_group):
                x = ResBlock(
                    2**g * cfg.n_hid,
                    (3, 3, 3, 1),
                    cfg.post_gain,
                    dtype,
                    name=f"group_{g + 1}_block_{i + 1}",
                )(x)
            if g < cfg.group_count - 1:
                x = max_pool2d(x)
            x = _group_boundary(x)
        # The logits are computed in float32 whatever the compute dtype, as in the reference.
        x = nn.relu(x).astype(jnp.float32)
        logits = Conv2d(cfg.vocab_size, 1, axes=("conv_in", "vocab"), name="output")(x)
        return nn.with_logical_constraint(logits, ("batch", "height", "width", "vocab"))


class Decoder(nn.Module):
    """Codes [b, h, w, vocab] (one-hot or relaxed) or token ids int [b, h, w] -> float32
    [b, h * d, w * d, 2 * out]: the logit-Laplace location mu (first half) and ln b (second half).
    Group widths are 8, 4, 2, 1 x n_hid with a nearest 2x upsampling between groups."""

    config: DVAEConfig

    @nn.compact
    def __call__(self, codes: jax.Array) -> jax.Array:
        cfg = self.config
        if jnp.issubdtype(codes.dtype, jnp.integer):
            codes = jax.nn.one_hot(codes, cfg.vocab_size, dtype=jnp.float32)
        if codes.ndim != 4 or codes.shape[-1] != cfg.vocab_size:
            raise ValueError(
                f"expected codes [b, h, w, {cfg.vocab_size}] or ids [b, h, w], got {codes.shape}"
            )
        dtype = jnp.dtype(cfg.dtype)
        # The codebook conv runs in float32 whatever the compute dtype, as in the reference.
        x = Conv2d(cfg.n_init, 1, axes=("vocab", "conv_out"), name="input")(codes)
        for g in range(cfg.group_count):
            for i in range(cfg.n_blk_per_group):
                x = ResBlock(
                    2 ** (cfg.group_count - 1 - g) * cfg.n_hid,
                    (1, 3, 3, 3),
                    cfg.post_gain,
                    dtype,
                    name=f"group_{g + 1}_block_{i + 1}",
                )(x)
            if g < cfg.group_count - 1:
                x = upsample_nearest2d(x)
            x = _group_boundary(x)
        x = Conv2d(2 * cfg.output_channels, 1, dtype=dtype, name="output")(nn.relu(x))
        return x.astype(jnp.float32)


def map_pixels(x: jax.Array) -> jax.Array:
    """[0, 1] -> [eps, 1 - eps], the support the logit-Laplace density is evaluated on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: jax.Array) -> jax.Array:
    """Inverse of :func:`map_pixels`, clipped to [0, 1]."""
    return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0.0, 1.0)


def logit_laplace_log_prob(x: jax.Array, mu: jax.Array, log_b: jax.Array) -> jax.Array:
    """Elementwise log f(x | mu, b) of the logit-Laplace density on (0, 1) (App. A.3):
    f = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)). ``x`` are mapped pixels in (eps, 1 - eps)."""
    log_x, log_1mx = jnp.log(x), jnp.log1p(-x)
    z = jnp.abs(log_x - log_1mx - mu) * jnp.exp(-log_b)  # |logit(x) - mu| / b
    return -z - log_b - math.log(2.0) - log_x - log_1mx


def split_stats(stats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Decoder output [..., 2c] -> (mu, ln b), each [..., c]."""
    c = stats.shape[-1] // 2
    return stats[..., :c], stats[..., c:]


def reconstruct(stats: jax.Array) -> jax.Array:
    """Decoder output -> images in [0, 1]: the unmapped sigmoid of the location mu."""
    return unmap_pixels(jax.nn.sigmoid(split_stats(stats)[0]))


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 images -> float32 in [0, 1]; float images are taken to be in [0, 1] already."""
    if jnp.issubdtype(images.dtype, jnp.integer):
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def init_dvae(config: DVAEConfig, rng: jax.Array) -> dict:
    """Fresh variables ``{"encoder": {"params"}, "decoder": {"params"}}``, logically annotated.

    The convolutions do not depend on the image size, so the smallest valid input is used.
    """
    enc_rng, dec_rng = jax.random.split(rng)
    side = config.downsample
    images = jnp.zeros((1, side, side, config.input_channels), jnp.float32)
    ids = jnp.zeros((1, 1, 1), jnp.int32)
    return {
        "encoder": Encoder(config).init(enc_rng, images),
        "decoder": Decoder(config).init(dec_rng, ids),
    }


def init_train_variables(config: DVAEConfig, rng: jax.Array) -> dict:
    """Fresh ``{"params": {"encoder": ..., "decoder": ...}}``, the training-state layout."""
    return {"params": {half: v["params"] for half, v in init_dvae(config, rng).items()}}


def as_dvae_variables(params: dict) -> dict:
    """Training params ``{"encoder", "decoder"}`` -> the variables :func:`encode` takes."""
    return {half: {"params": p} for half, p in params.items()}


def encode(config: DVAEConfig, variables: dict, images: jax.Array) -> jax.Array:
    """Images [b, H, W, c] in [0, 1] (or uint8) -> the most likely token ids int32 [b, h, w]."""
    logits = Encoder(config).apply(variables["encoder"], map_pixels(to_unit_range(images)))
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def decode(config: DVAEConfig, variables: dict, ids: jax.Array) -> jax.Array:
    """Token ids int [b, h, w] -> images float32 [b, H, W, c] in [0, 1]."""
    return reconstruct(Decoder(config).apply(variables["decoder"], ids.astype(jnp.int32)))
