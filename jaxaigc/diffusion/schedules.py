"""Gaussian diffusion: noise schedules, the forward process and its posterior, one reverse step.

DDPM (Ho et al. 2020), improved DDPM (Nichol & Dhariwal 2021: the cosine schedule, learned-range
variances, respacing), DDIM (Song et al. 2021) and the v parameterisation (Salimans & Ho 2022),
written after openai/guided-diffusion ``gaussian_diffusion.py`` / ``respace.py``. With
ab_t = prod_{s <= t} (1 - beta_s) and t in [0, T):

    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps                          (q_sample)
    v   = sqrt(ab_t) eps - sqrt(1 - ab_t) x0                           (v_from)
    q(x_{t-1} | x_t, x0) = N(c1_t x0 + c2_t x_t, beta_t (1 - ab_{t-1}) / (1 - ab_t))

Precision: every table is computed in float64 NumPy (the ``Diffusion`` attributes) and gathered
per timestep from a float32 copy, as guided-diffusion's ``_extract_into_tensor`` casts after
gathering; derived coefficients such as sqrt(1 / ab - 1) are therefore exact to float32 rather
than recomputed from a rounded ab. A ``Diffusion`` hashes by its tables, so it is a static
argument of a jit (its tables become compile-time constants).

Timesteps: ``t`` indexes this process's steps. A respaced process (``respace``) keeps the original
timestep of each of its steps in ``timesteps``; the model is always called with
``model_timesteps(t)``, the timestep it was trained on. Concrete ``t`` outside [0, T) is an
error; traced ``t`` outside it gathers NaN rather than a clamped neighbour.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

VARIANCES = ("fixed_small", "fixed_large", "learned_range")


def cosine_alpha_bar(s: np.ndarray) -> np.ndarray:
    """alphabar(s) = cos^2(((s + 0.008) / 1.008) pi / 2) at s = t / T in [0, 1] (float64)."""
    return np.cos((np.asarray(s, np.float64) + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_timesteps: int, *, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule: beta_t = min(1 - ab((t + 1) / T) / ab(t / T), max_beta)
    (guided-diffusion ``betas_for_alpha_bar``; the cap keeps the last steps from beta = 1).

    Returns: float64 [num_timesteps].
    """
    _check_num_timesteps(num_timesteps)
    s = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(s)
    return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule from 1e-4 to 0.02, both scaled by 1000 / T so that other step
    counts cover the same noise levels (guided-diffusion ``get_named_beta_schedule("linear")``);
    below T = 20 the last betas exceed 1, which ``Diffusion`` rejects.

    Returns: float64 [num_timesteps].
    """
    _check_num_timesteps(num_timesteps)
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def spaced_timesteps(num_timesteps: int, steps: int) -> np.ndarray:
    """``steps`` timesteps of [0, num_timesteps) spaced evenly, first and last included, rounded
    (guided-diffusion ``space_timesteps(T, [steps])``). Returns: int64 [steps], increasing."""
    _check_num_timesteps(num_timesteps)
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return np.array([num_timesteps - 1])
    stride = (num_timesteps - 1) / (steps - 1)
    return np.array([round(i * stride) for i in range(steps)])


def _check_num_timesteps(num_timesteps: int) -> None:
    if num_timesteps < 1:
        raise ValueError(f"the number of timesteps must be positive, got {num_timesteps}")


def _gather(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """table[t] as float32, shaped [b, 1, ..., 1] to broadcast against an ndim-array; NaN where t
    is outside the table."""
    values = (
        jnp.asarray(table, jnp.float32)
        .at[t]
        .get(mode="fill", fill_value=jnp.nan, wrap_negative_indices=False)
    )
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class Diffusion:
    """The tables of a Gaussian diffusion with ``betas`` [T] in (0, 1], and its per-step maths.

    Array arguments: x0, xt, eps, v [b, ...] (any trailing shape); t int [b] in [0, T).
    """

    def __init__(self, betas: Sequence[float] | np.ndarray, *, timesteps: np.ndarray | None = None):
        """``timesteps`` [T]: the model's timestep for each step (``respace`` sets it; default
        0 .. T - 1)."""
        betas = np.array(betas, np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty vector, got shape {betas.shape}")
        bad = ~((betas > 0) & (betas <= 1))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"betas must be in (0, 1]; betas[{i}] = {betas[i]}")
        timesteps = np.arange(betas.size) if timesteps is None else np.array(timesteps, np.int64)
        if timesteps.shape != betas.shape:
            raise ValueError(f"timesteps has shape {timesteps.shape}, betas {betas.shape}")
        self.betas, self.timesteps = betas, timesteps
        self.num_timesteps = betas.size
        for table in (betas, timesteps):
            table.flags.writeable = False  # the hash below must stay valid

        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # beta = 1 is allowed (guided-diffusion's linear schedule at T = 20 ends there): ab = 0,
        # and x0 cannot be recovered from x_t at that step (these two tables are inf).
        with np.errstate(divide="ignore"):
            self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
            self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # Posterior q(x_{t-1} | x_t, x0) (DDPM Eq. 6-7).
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / one_minus
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / one_minus
        )
        # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1, and the
        # "fixed large" variance (beta_t) likewise starts at it (guided-diffusion); with T = 1
        # there is no t = 1 and beta_0 stands in (the last step adds no noise anyway).
        first = self.posterior_variance[1] if betas.size > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.large_log_variance = np.log(np.append(first, betas[1:]))

    @functools.cached_property
    def _key(self) -> tuple[bytes, bytes]:
        return self.betas.tobytes(), self.timesteps.tobytes()

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Diffusion) and self._key == other._key

    def __repr__(self) -> str:
        first, last = self.timesteps[0], self.timesteps[-1]
        return f"Diffusion(T={self.num_timesteps}, timesteps {first}..{last})"

    def check_timesteps(self, t: jax.Array, *, allow_clean: bool = False) -> None:
        """Raises ``ValueError`` if a concrete ``t`` is outside [0, T) ([-1, T) with
        ``allow_clean``: -1 is the data itself). Traced values are not checked."""
        if isinstance(t, jax.core.Tracer):
            return
        t = np.asarray(t)
        low = -1 if allow_clean else 0
        if t.size and (t.min() < low or t.max() >= self.num_timesteps):
            bad = t.min() if t.min() < low else t.max()
            raise ValueError(f"timestep {bad} is outside [{low}, {self.num_timesteps})")

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """The model's (original) timestep of each step t: int32 [b] (-1 where t is outside)."""
        self.check_timesteps(t)
        return (
            jnp.asarray(self.timesteps, jnp.int32)
            .at[t]
            .get(mode="fill", fill_value=-1, wrap_negative_indices=False)
        )

    def respace(self, use_timesteps: Sequence[int]) -> Diffusion:
        """The process that visits only ``use_timesteps`` (increasing steps of this process):
        beta_i = 1 - ab_{t_i} / ab_{t_{i-1}} (ab_{t_{-1}} = 1), so its ab_i equal ab_{t_i}.
        Its ``timesteps`` map each new step to the original one."""
        use = np.array(use_timesteps)
        if use.ndim != 1 or use.size == 0 or not np.issubdtype(use.dtype, np.integer):
            raise ValueError(f"use_timesteps must be a non-empty list of ints, got {use_timesteps}")
        if use[0] < 0 or use[-1] >= self.num_timesteps:
            raise ValueError(
                f"use_timesteps must lie in [0, {self.num_timesteps}), got {use[0]}..{use[-1]}"
            )
        if (np.diff(use) <= 0).any():
            i = int(np.argmax(np.diff(use) <= 0))
            raise ValueError(
                f"use_timesteps must increase strictly; {use[i + 1]} follows {use[i]} at index "
                f"{i + 1}"
            )
        alphas_cumprod = self.alphas_cumprod[use]
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        return Diffusion(betas, timesteps=self.timesteps[use])

    def q_sample(self, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise."""
        self.check_timesteps(t)
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def q_posterior(
        self, x0: jax.Array, xt: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q(x_{t-1} | x_t, x0): (mean [b, ...], variance [b, 1...], log-variance clipped at t = 0
        to its t = 1 value [b, 1...])."""
        self.check_timesteps(t)
        mean = (
            _gather(self.posterior_mean_coef1, t, xt.ndim) * x0
            + _gather(self.posterior_mean_coef2, t, xt.ndim) * xt
        )
        variance = _gather(self.posterior_variance, t, xt.ndim)
        return mean, variance, _gather(self.posterior_log_variance_clipped, t, xt.ndim)

    def x0_from_eps(self, xt: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        """x0 = sqrt(1 / ab_t) x_t - sqrt(1 / ab_t - 1) eps."""
        return (
            _gather(self.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt
            - _gather(self.sqrt_recipm1_alphas_cumprod, t, xt.ndim) * eps
        )

    def eps_from_x0(self, xt: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
        """eps = (sqrt(1 / ab_t) x_t - x0) / sqrt(1 / ab_t - 1)."""
        return (_gather(self.sqrt_recip_alphas_cumprod, t, xt.ndim) * xt - x0) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, xt.ndim
        )

    def v_from(self, x0: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0.ndim) * eps
            - _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
        )

    def x0_from_v(self, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
        """x0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, xt.ndim) * xt
            - _gather(self.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * v
        )

    def eps_from_v(self, xt: jax.Array, t: jax.Array, v: jax.Array) -> jax.Array:
        """eps = sqrt(1 - ab_t) x_t + sqrt(ab_t) v."""
        return (
            _gather(self.sqrt_one_minus_alphas_cumprod, t, xt.ndim) * xt
            + _gather(self.sqrt_alphas_cumprod, t, xt.ndim) * v
        )

    def split_prediction(
        self, output: jax.Array, xt: jax.Array, t: jax.Array, *, prediction: str
    ) -> tuple[jax.Array, jax.Array]:
        """A model's ``output`` [b, ...] predicting ``prediction`` ("eps", "x0" or "v") at x_t ->
        (x0, eps)."""
        check_prediction(prediction)
        self.check_timesteps(t)
        if prediction == "eps":
            return self.x0_from_eps(xt, t, output), output
        if prediction == "x0":
            return output, self.eps_from_x0(xt, t, output)
        return self.x0_from_v(xt, t, output), self.eps_from_v(xt, t, output)

    def log_variance(
        self, t: jax.Array, ndim: int, *, variance: str, frac: jax.Array | None = None
    ) -> jax.Array:
        """log sigma_t^2 of a reverse step, broadcastable to ``ndim`` dims.

        ``variance``: "fixed_small" (the posterior variance, log clipped at t = 0), "fixed_large"
        (beta_t; at t = 0 the posterior's t = 1 value), or "learned_range" (improved DDPM Eq. 15:
        the model's ``frac`` [b, ...] in [-1, 1] interpolates the logs of both).
        """
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; use one of {VARIANCES}")
        if (variance == "learned_range") != (frac is not None):
            raise ValueError(f"frac is needed by variance='learned_range' only, got {variance!r}")
        small = _gather(self.posterior_log_variance_clipped, t, ndim)
        if variance == "fixed_small":
            return small
        if variance == "fixed_large":
            return _gather(self.large_log_variance, t, ndim)
        large = _gather(np.log(self.betas), t, ndim)
        weight = (frac + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        return weight * large + (1.0 - weight) * small

    def ddpm_step(
        self,
        xt: jax.Array,
        t: jax.Array,
        x0: jax.Array,
        noise: jax.Array,
        *,
        variance: str = "fixed_small",
        frac: jax.Array | None = None,
    ) -> jax.Array:
        """Ancestral step x_{t-1} = posterior mean(x0, x_t) + sigma_t noise, no noise at t = 0.

        Args: xt [b, ...]; t int [b]; x0 the model's (processed) estimate [b, ...]; noise
        N(0, I) [b, ...]; variance, frac: see ``log_variance``. Returns: x_{t-1} [b, ...].
        """
        mean, _, _ = self.q_posterior(x0, xt, t)
        log_variance = self.log_variance(t, xt.ndim, variance=variance, frac=frac)
        nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (xt.ndim - 1))
        return mean + nonzero * jnp.exp(0.5 * log_variance) * noise

    def ddim_step(
        self,
        xt: jax.Array,
        eps: jax.Array,
        t: jax.Array,
        t_prev: jax.Array,
        *,
        eta: float = 0.0,
        noise: jax.Array | None = None,
        x0: jax.Array | None = None,
    ) -> jax.Array:
        """DDIM (Song et al. 2021, Eq. 12): x' = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps +
        sigma noise, sigma = eta sqrt((1 - ab') / (1 - ab_t)) sqrt(1 - ab_t / ab').

        Args: xt [b, ...]; eps the model's noise estimate [b, ...]; t int [b]; t_prev int [b] in
        [-1, t) (-1: the data, ab' = 1); eta >= 0 (0: deterministic, 1: DDPM's posterior when
        t_prev = t - 1); noise N(0, I) [b, ...], needed when eta > 0; x0 the estimate to step
        towards, default from eps (pass a clipped x0 with eps = ``eps_from_x0`` of it).
        Returns: x_{t_prev} [b, ...].
        """
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta > 0 and noise is None:
            raise ValueError(f"eta = {eta} > 0 needs noise")
        self.check_timesteps(t)
        self.check_timesteps(t_prev, allow_clean=True)
        x0 = self.x0_from_eps(xt, t, eps) if x0 is None else x0
        ab = _gather(self.alphas_cumprod, t, xt.ndim)
        # ab at t_prev = -1 is 1: index T of the extended table (-2 and below stay out of range).
        t_prev = jnp.where(t_prev == -1, self.num_timesteps, t_prev)
        ab_prev = _gather(np.append(self.alphas_cumprod, 1.0), t_prev, xt.ndim)
        sigma = eta * jnp.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))
        # max(., 0): rounding can make 1 - ab' - sigma^2 a hair negative when eta = 1 at t = 0.
        x_prev = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - ab_prev - sigma**2, 0.0)) * eps
        return x_prev if noise is None else x_prev + sigma * noise


PREDICTIONS = ("eps", "x0", "v")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; use one of {PREDICTIONS}")
