"""The GPU attention paths against XLA's dense attention, outputs, gradients and times: DALL-E's
masks through the block-sparse Pallas (Triton) kernel, and causal and no-mask attention through
cuDNN (``jaxaigc.nn.attention.dot_product_attention``, ``impl="cudnn"``):

    python experiments/bench/gpu_attention_check.py            # on a GPU: the paper's 256 + 32^2
    python experiments/bench/gpu_attention_check.py --size cpu # interpreted, tiny: checks it runs

One JSON line per row: the path, the largest difference from the dense reference in the output
and in the gradients (relative to the reference's largest entry), and the median forward +
backward time of the path and of the reference, in bfloat16 on a GPU (float32 on CPU).
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.nn.attention import dot_product_attention
from jaxaigc.nn.sparse import dalle_mask
from jaxaigc.nn.sparse_triton import triton_sparse_attention

SIZES = {  # batch, heads, head size, text_len, image_side
    "gpu": (8, 16, 64, 256, 32),
    "cpu": (1, 2, 16, 8, 8),
}


def timed_value_and_grads(attend, q, k, v, repeats: int):
    """Output, gradients of sum(sin(output)) and the median seconds of one jitted call."""

    def loss(q, k, v):
        return jnp.sum(jnp.sin(attend(q, k, v).astype(jnp.float32)))

    both = jax.jit(lambda q, k, v: (attend(q, k, v), jax.grad(loss, (0, 1, 2))(q, k, v)))
    result = jax.block_until_ready(both(q, k, v))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(both(q, k, v))
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def compare(name: str, attend, reference, q, k, v, repeats: int) -> None:
    try:
        ours, ours_s = timed_value_and_grads(attend, q, k, v, repeats)
    except Exception as error:  # a row that fails says why and the others still run
        print(json.dumps(dict(path=name, error=f"{type(error).__name__}: {error}"[:500])))
        return
    expected, reference_s = timed_value_and_grads(reference, q, k, v, repeats)

    def error(a, b):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        return float(np.abs(a - b).max() / np.abs(b).max())

    row = dict(
        path=name,
        out_error=error(ours[0], expected[0]),
        grad_error=max(error(a, b) for a, b in zip(ours[1], expected[1], strict=True)),
        ms=round(ours_s * 1e3, 3),
        dense_ms=round(reference_s * 1e3, 3),
    )
    print(json.dumps(row), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="gpu")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    batch, heads, head_dim, text_len, side = SIZES[args.size]
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.bfloat16 if on_gpu else jnp.float32
    n = text_len + side * side
    q, k, v = (
        jax.random.normal(jax.random.key(i), (batch, n, heads, head_dim), dtype) for i in range(3)
    )
    print(json.dumps(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, n=n)))
    for kind in ("row", "column", "conv", "dense"):
        mask = jnp.asarray(dalle_mask(kind, text_len, side))[None, None]
        compare(
            f"triton {kind}",
            lambda q, k, v, kind=kind: triton_sparse_attention(
                q, k, v, kind=kind, text_len=text_len, image_side=side
            ),
            lambda q, k, v, mask=mask: jax.nn.dot_product_attention(q, k, v, mask=mask),
            q,
            k,
            v,
            args.repeats,
        )
    if on_gpu:
        for causal in (True, False):
            compare(
                f"cudnn causal={causal}",
                lambda q, k, v, c=causal: dot_product_attention(q, k, v, causal=c, impl="cudnn"),
                lambda q, k, v, c=causal: jax.nn.dot_product_attention(q, k, v, is_causal=c),
                q,
                k,
                v,
                args.repeats,
            )


if __name__ == "__main__":
    main()
