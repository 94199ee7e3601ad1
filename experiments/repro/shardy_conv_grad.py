"""Shardy (jax 0.10.2) computes a wrong gradient; GSPMD a right one. Run it after a jax upgrade to
see whether ``jaxaigc.parallel.partitioner`` can go back to Shardy everywhere.

    python experiments/repro/shardy_conv_grad.py [--gspmd]

A 1x1 then a 3x3 convolution with biases on 4x4 images, on 8 emulated CPU devices as a 2x2x2
(data, fsdp, tensor) mesh: batch on (data, fsdp), kernels' input channels on fsdp, biases on
tensor. Prints each gradient's largest difference from the one-device gradient, relative to its
largest entry (rounding: ~3e-7).
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def conv(x, kernel):
    pad = (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((pad, pad),) * 2, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def loss(params, x):
    k1, k2, b1, b2 = params
    return jnp.sum(jnp.sin(conv(jax.nn.relu(conv(x, k1) + b1), k2) + b2))


def main():
    if "--gspmd" in sys.argv:
        jax.config.update("jax_use_shardy_partitioner", False)
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    rng = np.random.default_rng(0)
    params = (
        rng.normal(size=(1, 1, 16, 16)).astype(np.float32) / 4,
        rng.normal(size=(3, 3, 16, 16)).astype(np.float32) / 12,
        rng.normal(size=16).astype(np.float32) / 10,
        rng.normal(size=16).astype(np.float32) / 10,
    )
    x = rng.normal(size=(8, 4, 4, 16)).astype(np.float32)
    grad = jax.grad(loss)
    expected = jax.jit(grad)(params, x)
    kernel = NamedSharding(mesh, P(None, None, "fsdp", None))
    bias = NamedSharding(mesh, P("tensor"))
    shardings = (kernel, kernel, bias, bias)
    sharded = jax.jit(grad, out_shardings=shardings)(
        jax.device_put(params, shardings),
        jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))),
    )
    partitioner = "Shardy" if jax.config.jax_use_shardy_partitioner else "GSPMD"
    print(f"jax {jax.__version__}, {partitioner}")
    for name, got, want in zip(("k1", "k2", "b1", "b2"), sharded, expected, strict=True):
        got, want = np.asarray(got), np.asarray(want)
        print(f"{name}: {np.abs(got - want).max() / np.abs(want).max():.1e}")


if __name__ == "__main__":
    main()
