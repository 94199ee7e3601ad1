"""Equivalence with Hugging Face diffusers' DDPM and DDIM schedulers (their float32 torch tables,
so tolerances are float32's): betas, one DDPM step per variance, one DDIM step per prediction,
a whole DDIM loop, and dynamic thresholding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.diffusion import Diffusion, cosine_betas, linear_betas
from jaxaigc.sample.diffusion import dynamic_threshold, sample_ddim

torch = pytest.importorskip("torch", reason="torch (the `reference` extra) is not installed")
diffusers = pytest.importorskip(
    "diffusers",
    reason="diffusers is not installed: pip install 'diffusers==0.42.1' (`reference` extra)",
)

T = 1000
PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _ddpm(**config):
    return diffusers.DDPMScheduler(num_train_timesteps=T, clip_sample=False, **config)


def _ddim(**config):
    return diffusers.DDIMScheduler(
        num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True, **config
    )


def test_betas_equal_diffusers():
    cosine = _ddpm(beta_schedule="squaredcos_cap_v2").betas.numpy()
    np.testing.assert_allclose(cosine, cosine_betas(T).astype(np.float32), rtol=1e-6)
    for steps in (T, 250):  # guided-diffusion scales the linear ends by 1000 / T
        scale = 1000 / steps
        linear = diffusers.DDPMScheduler(
            num_train_timesteps=steps, beta_start=1e-4 * scale, beta_end=0.02 * scale
        ).betas.numpy()
        np.testing.assert_allclose(linear, linear_betas(steps), rtol=1e-6)


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_step_equals_diffusers(variance):
    scheduler = _ddpm(beta_schedule="squaredcos_cap_v2", variance_type=variance)
    d = Diffusion(cosine_betas(T))
    rng = np.random.default_rng(0)
    channels = 6 if variance == "learned_range" else 3
    for t in (1, 10, 500, 900):
        x = rng.normal(size=(4, 3)).astype(np.float32)
        out = rng.uniform(-1, 1, size=(4, channels)).astype(np.float32)
        noise = torch.randn((4, 3), generator=torch.Generator().manual_seed(t))
        expected = scheduler.step(
            torch.from_numpy(out), t, torch.from_numpy(x),
            generator=torch.Generator().manual_seed(t),
        ).prev_sample.numpy()  # fmt: skip
        tt = jnp.full((4,), t, jnp.int32)
        eps, frac = out[:, :3], (out[:, 3:] if variance == "learned_range" else None)
        x0 = d.x0_from_eps(jnp.asarray(x), tt, jnp.asarray(eps))
        got = d.ddpm_step(x, tt, x0, jnp.asarray(noise.numpy()), variance=variance, frac=frac)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"t={t}")


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_ddim_step_equals_diffusers(prediction):
    scheduler = _ddim(
        beta_schedule="squaredcos_cap_v2", prediction_type=PREDICTION_TYPES[prediction]
    )
    scheduler.set_timesteps(20)  # strides of 50: t -> t - 50
    d = Diffusion(cosine_betas(T))
    rng = np.random.default_rng(1)
    for t in (0, 50, 500, 950):
        x, out, noise = rng.normal(size=(3, 4, 2, 3)).astype(np.float32)
        for eta in (0.0, 0.5):
            expected = scheduler.step(
                torch.from_numpy(out), t, torch.from_numpy(x), eta=eta,
                variance_noise=torch.from_numpy(noise),
            ).prev_sample.numpy()  # fmt: skip
            tt = jnp.full((4,), t, jnp.int32)
            x0, eps = d.split_prediction(jnp.asarray(out), x, tt, prediction=prediction)
            t_prev = np.full(4, max(t - 50, -1))  # -1: the data (diffusers' final ab = 1)
            got = d.ddim_step(x, eps, tt, t_prev, eta=eta, noise=noise, x0=x0)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"{t} {eta}")


def test_ddim_loop_equals_diffusers_on_a_respaced_process():
    """diffusers' "leading" spacing of 10 steps (0, 100, ..., 900) is this process respaced."""
    scheduler = _ddim(beta_schedule="squaredcos_cap_v2")
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == list(range(900, -1, -100))
    x_T = np.random.default_rng(2).normal(size=(3, 4)).astype(np.float32)

    def eps_model(x, t, lib):  # any smooth function of (x, t)
        return lib.sin(x) * 0.5 + 0.001 * t

    x = torch.from_numpy(x_T)
    for t in scheduler.timesteps:
        x = scheduler.step(eps_model(x, float(t), torch), t, x).prev_sample
    d = Diffusion(cosine_betas(T)).respace(range(0, T, 100))
    model_fn = lambda x, t: eps_model(x, t[:, None].astype(jnp.float32), jnp)
    got = sample_ddim(d, model_fn, x_T.shape, jax.random.key(0), initial_noise=jnp.asarray(x_T))
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-4, atol=1e-4)


def test_dynamic_threshold_equals_diffusers():
    scheduler = _ddpm(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1e9)
    x0 = np.random.default_rng(3).normal(size=(4, 3, 5, 5)).astype(np.float32)
    x0 *= np.array([0.3, 1, 2, 5], np.float32)[:, None, None, None]
    expected = scheduler._threshold_sample(torch.from_numpy(x0)).numpy()
    np.testing.assert_allclose(
        dynamic_threshold(jnp.asarray(x0), percentile=0.9), expected, rtol=1e-6
    )
