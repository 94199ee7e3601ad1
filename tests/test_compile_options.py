"""Inference compiled with ``jit_inference``'s XLA:CPU options gives XLA's default results; each
platform's training options."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxaigc.compile_options import (
    CPU_TRAINING_OPTIONS,
    GPU_TRAINING_OPTIONS,
    apply_in_batches,
    inference_options,
    jit_inference,
    training_options,
)
from jaxaigc.models.clip import CLIP, CLIPConfig


@pytest.mark.parametrize("name", ["tiny-rn", "tiny-vit"])
def test_jit_inference_matches_xla_defaults(name):
    config = CLIPConfig.from_name(name)
    model = CLIP(config)
    r = config.image_resolution
    images = np.random.default_rng(0).normal(size=(4, r, r, 3)).astype(np.float32)
    tokens = np.zeros((1, config.context_length), np.int32)
    variables = model.init(jax.random.key(0), images[:1], tokens)
    # Random BatchNorm statistics: init's zero means and unit variances would hide their use.
    stats = jax.tree.map(
        lambda x: np.abs(np.random.default_rng(1).normal(size=x.shape)).astype(np.float32),
        variables.get("batch_stats", {}),
    )
    variables = {**variables, "batch_stats": stats} if stats else variables

    def encode(v, x):
        return model.apply(v, x, method="encode_image")

    assert inference_options()  # these tests run on CPU devices
    tuned, default = jit_inference(encode), jax.jit(encode)
    tuned_hlo, default_hlo = (
        f.lower(variables, images).compile().as_text() for f in (tuned, default)
    )
    assert tuned_hlo.count("ynn_fusion") != default_hlo.count("ynn_fusion")  # the options apply
    expected = np.asarray(default(variables, images))
    np.testing.assert_allclose(
        tuned(variables, images), expected, atol=1e-5 * np.abs(expected).max(), rtol=0
    )


def test_apply_in_batches_equals_one_call_and_compiles_one_shape():
    shapes = []

    def encode(x):
        shapes.append(x.shape)
        return x * 2.0

    inputs = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
    np.testing.assert_array_equal(apply_in_batches(encode, inputs, 10), inputs * 2)
    assert shapes == [(10, 3)] * 3  # the last 3 rows padded to 10
    np.testing.assert_array_equal(apply_in_batches(encode, inputs[:4], 10), inputs[:4] * 2)


def test_training_options_by_platform_are_xla_options():
    def mesh_on(platform):  # only the first device's platform is read
        device = types.SimpleNamespace(platform=platform)
        return types.SimpleNamespace(devices=np.array([device], dtype=object))

    assert training_options(mesh_on("cpu")) == CPU_TRAINING_OPTIONS
    assert training_options(mesh_on("gpu")) == GPU_TRAINING_OPTIONS
    assert training_options(mesh_on("tpu")) == {}
    # XLA rejects an unknown option name at compile time, on any backend.
    double = jax.jit(lambda x: 2 * x, compiler_options=GPU_TRAINING_OPTIONS)
    np.testing.assert_array_equal(double.lower(jnp.ones(3)).compile()(jnp.ones(3)), 2)
