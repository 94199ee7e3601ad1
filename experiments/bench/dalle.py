"""Benchmark: DALL-E's sparse attention and KV-cache sampling on this machine, in one run.

    python experiments/bench/dalle.py [--parts attention,layer,decode --repeats 5 --threads 2]

``attention``: one attention op, forward and backward (gradients of ``sum(out * g)`` for q, k, v),
at the paper's layout (256 text + 32 x 32 image tokens = 1280, 16 heads of 64, batch 1, fp32) for
each image mask kind: :func:`jaxaigc.nn.sparse.sparse_attention` against
``jax.nn.dot_product_attention`` with the ``[1280, 1280]`` ``dalle_mask``. Time is the median of
interleaved repeats (``timing.median_times``); memory is XLA's ``temp_size_in_bytes`` of each
compiled program (its scratch buffers: scores, probabilities, residuals), the same on any backend
up to fusion; FLOPs are the attention matmuls counted from the shapes (XLA's cost analysis counts
the sparse path's loop over query blocks once): dense 6 per scored pair (2 forward, 4 backward),
sparse 7 (its backward recomputes the scores), as a fraction of the fp32 matmul ceiling measured
in the same run.

``layer``: a whole row-attention layer (q/k/v/out projections included, width 1024, forward and
backward for the input and every parameter, fp32): jaxaigc's ``MultiHeadAttention`` with the
sparse row kernel (and with the dense masked path) against DALLE-pytorch's
``SparseAxialCausalAttention(axis=0)`` on the same job. Not the same function: DALLE-pytorch's
axial row attention lets an image token see itself and the earlier tokens of *its own grid row*
only (1-32 image keys), where the paper's row mask is a sliding window of itself and the previous
32 raster positions (33 keys from the second row on, reaching into the previous row); both let
every image token see all 256 text tokens, text causal. DALLE-pytorch also projects q/k/v without
biases. PyTorch runs on the CPU with ``--threads`` threads, in this process.

``decode``: the 1,024 image tokens of a 32 x 32 grid after a 256-token caption, on a small-width
model (``--decode-width`` etc.): ``sample_image_tokens`` (KV cache, one ``lax.scan``) against
recomputing the full sequence at every step (a jitted forward over the padded 1280 tokens with the
sparse training path, greedy choice at the step's position). Every recompute step has the same
shapes and cost, so it is timed on ``--recompute-steps`` steps and extrapolated to 1,024.
"""

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxaigc.benchmark import (
    add_allocator_flag,
    dalle_pytorch_attention,
    matmul_ceiling,
    median_times,
    use_retaining_malloc,
)
from jaxaigc.compile_options import CPU_TRAINING_OPTIONS
from jaxaigc.models.dalle import DALLE, DALLEConfig
from jaxaigc.nn.attention import MultiHeadAttention
from jaxaigc.nn.sparse import DALLEMask, dalle_mask, scored_pairs, sparse_attention
from jaxaigc.sample.decode import sample_image_tokens

TEXT_LEN, SIDE, HEADS, HEAD_DIM = 256, 32, 16, 64
MIB = 2**20


def compile_with_options(fn, *args):
    """``fn`` jitted and compiled for ``args`` with the library's XLA:CPU training options (the
    options a train step gets; XLA's defaults elsewhere)."""
    options = CPU_TRAINING_OPTIONS if jax.default_backend() == "cpu" else {}
    return jax.jit(fn, compiler_options=options).lower(*args).compile()


def flops_of(compiled) -> float:
    cost = compiled.cost_analysis()
    return cost["flops"] if cost else float("nan")


def attention_flops(kind: str, block_size: int | None) -> float:
    """Matmul FLOPs of one forward + backward; ``block_size`` None is dense masked attention."""
    per_pair = 2 * HEADS * HEAD_DIM
    if block_size is None:
        return 6 * per_pair * (TEXT_LEN + SIDE**2) ** 2
    return 7 * per_pair * scored_pairs(kind, TEXT_LEN, SIDE, block_size=block_size)


def attention_rows(
    block_sizes: list[int], repeats: int, settle: float, ceiling: float
) -> list[dict]:
    """Sparse (at each block size) vs dense masked attention, forward + backward, per mask kind."""
    n = TEXT_LEN + SIDE**2
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(key, (1, n, HEADS, HEAD_DIM)) for key in keys)

    def fwd_bwd(attend):
        def loss(q, k, v):
            return jnp.sum(attend(q, k, v) * g)

        return jax.grad(loss, argnums=(0, 1, 2))

    rows = []
    for kind in ("row", "column", "conv"):
        mask = jnp.asarray(dalle_mask(kind, TEXT_LEN, SIDE))
        compiled = {
            f"sparse {size}": compile_with_options(
                fwd_bwd(
                    functools.partial(
                        sparse_attention,
                        kind=kind,
                        text_len=TEXT_LEN,
                        image_side=SIDE,
                        block_size=size,
                    )
                ),
                q,
                k,
                v,
            )
            for size in block_sizes
        }
        compiled["dense"] = compile_with_options(
            fwd_bwd(functools.partial(jax.nn.dot_product_attention, mask=mask)), q, k, v
        )
        expected = compiled["dense"](q, k, v)
        for name, c in compiled.items():  # the same function (checked outside the timing)
            for got, want in zip(c(q, k, v), expected, strict=True):
                np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-4, err_msg=name)
        times = median_times(
            [lambda c=c: jax.block_until_ready(c(q, k, v)) for c in compiled.values()],
            repeats,
            settle,
        )
        dense_s, dense_temp = times[-1], compiled["dense"].memory_analysis().temp_size_in_bytes
        sizes = [*block_sizes, None]
        for (name, c), seconds, size in zip(compiled.items(), times, sizes, strict=True):
            temp = c.memory_analysis().temp_size_in_bytes
            flops = attention_flops(kind, size)
            row = dict(
                kind=kind,
                path=name,
                ms=seconds * 1e3,
                temp_mib=temp / MIB,
                time_vs_dense=seconds / dense_s,
                memory_vs_dense=temp / dense_temp,
                gflops=flops / 1e9,
                ceiling=flops / seconds / ceiling,
            )
            rows.append(row)
            print(
                f"attention {kind}, {name}: {row['ms']:.1f} ms, {row['temp_mib']:.1f} MiB temp, "
                f"{row['gflops']:.2f} GFLOP ({row['ceiling']:.2f} of the ceiling) | vs dense: "
                f"time {row['time_vs_dense']:.2f}x, memory {row['memory_vs_dense']:.2f}x",
                flush=True,
            )
    return rows


def layer_rows(repeats: int, settle: float, ceiling: float) -> list[dict]:
    """A whole row-attention layer, forward + backward: jaxaigc (sparse, dense) vs DALLE-pytorch."""
    import torch

    n, width = TEXT_LEN + SIDE**2, HEADS * HEAD_DIM
    x = jax.random.normal(jax.random.key(0), (1, n, width))
    g = jax.random.normal(jax.random.key(1), (1, n, width))
    row_mask = DALLEMask("row", TEXT_LEN, SIDE)
    kernel = functools.partial(sparse_attention, kind="row", text_len=TEXT_LEN, image_side=SIDE)
    layers = {
        "sparse": MultiHeadAttention(HEADS, mask_fn=row_mask, attention_fn=kernel),
        "dense": MultiHeadAttention(HEADS, mask_fn=row_mask),
    }
    params = layers["sparse"].init(jax.random.key(2), x[:, :8])["params"]
    compiled = {}
    for name, layer in layers.items():

        def loss(params, x, layer=layer):
            return jnp.sum(layer.apply({"params": params}, x) * g)

        compiled[name] = compile_with_options(jax.grad(loss, argnums=(0, 1)), params, x)

    module = dalle_pytorch_attention()
    torch.manual_seed(0)
    # seq_len is DALLE-pytorch's model input length (text + image - 1); its text_len is derived
    # as seq_len + 1 - image_size**2 = 256, and a full 1280-token input is not padded further.
    t_layer = module.SparseAxialCausalAttention(
        dim=width, seq_len=n - 1, image_size=SIDE, axis=0, heads=HEADS, dim_head=HEAD_DIM
    )
    t_x = torch.from_numpy(np.array(x)).requires_grad_(True)
    t_g = torch.from_numpy(np.array(g))

    def torch_step():
        t_layer.zero_grad(set_to_none=True)
        t_x.grad = None
        (t_layer(t_x) * t_g).sum().backward()

    fns = [lambda c=c: jax.block_until_ready(c(params, x)) for c in compiled.values()]
    *jax_times, torch_s = median_times([*fns, torch_step], repeats, settle)
    rows = []
    for (name, c), seconds in zip(compiled.items(), jax_times, strict=True):
        flops = flops_of(c)
        rows.append(
            dict(
                row=f"jaxaigc MultiHeadAttention, {name} row",
                jax_ms=seconds * 1e3,
                torch_ms=torch_s * 1e3,
                temp_mib=c.memory_analysis().temp_size_in_bytes / MIB,
                flops=flops,
                ceiling=flops / seconds / ceiling,
            )
        )
        print(
            f"row layer: jaxaigc {name} {seconds * 1e3:.1f} ms ({flops / seconds / ceiling:.2f} of "
            f"the ceiling) | DALLE-pytorch SparseAxialCausalAttention {torch_s * 1e3:.1f} ms | "
            f"jax/torch {seconds / torch_s:.2f}",
            flush=True,
        )
    return rows


def decode_rows(args, settle: float) -> list[dict]:
    """Tokens/s of the KV-cache sampler against recomputing the whole sequence at each step."""
    text_vocab, image_vocab = (int(v) for v in args.decode_vocab.split("/"))
    config = DALLEConfig(
        text_len=TEXT_LEN,
        text_vocab=text_vocab,
        image_side=SIDE,
        image_vocab=image_vocab,
        width=args.decode_width,
        layers=args.decode_layers,
        heads=args.decode_heads,
    )
    model = DALLE(config)
    b = args.decode_batch
    rng = np.random.default_rng(0)
    text = jnp.asarray(rng.integers(1, config.text_vocab, (b, TEXT_LEN)), jnp.int32)
    image = jnp.zeros((b, config.image_len), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), text, image)["params"]

    def cached():
        return jax.block_until_ready(
            sample_image_tokens(config, params, text, rng=jax.random.key(1), temperature=0.0)
        )

    @jax.jit
    def recompute_step(params, text, image, i):
        """One step without a cache: the whole padded sequence, then image token i (greedy)."""
        _, logits = model.apply({"params": params}, text, image)
        token = jnp.argmax(logits[:, i], -1).astype(jnp.int32)
        return image.at[:, i].set(token)

    def recompute_steps():
        current = image
        for i in range(args.recompute_steps):
            current = recompute_step(params, text, current, i)
        return jax.block_until_ready(current)

    start = time.perf_counter()
    tokens = cached()
    first_call_s = time.perf_counter() - start
    # Greedy: both draw the same tokens up to float ties (the same function, computed two ways).
    steps = args.recompute_steps
    agree = np.mean(np.asarray(tokens[:, :steps]) == np.asarray(recompute_steps())[:, :steps])
    cached_s, recompute_s = median_times([cached, recompute_steps], args.decode_repeats, settle)
    recompute_full_s = recompute_s / args.recompute_steps * config.image_len
    row = dict(
        config=f"width {config.width}, {config.layers} layers, {config.heads} heads, text 256, "
        f"32x32 image, vocab {text_vocab} / {image_vocab}, batch {b}, fp32",
        cached_s=cached_s,
        first_call_s=first_call_s,
        cached_tokens_per_s=b * config.image_len / cached_s,
        recompute_step_ms=recompute_s / args.recompute_steps * 1e3,
        recompute_tokens_per_s=b * config.image_len / recompute_full_s,
        speedup=recompute_full_s / cached_s,
        agreement=float(agree),
    )
    print(
        f"decode 1024 tokens ({row['config']}): KV cache {cached_s:.2f} s = "
        f"{row['cached_tokens_per_s']:.0f} tokens/s (first call with compilation "
        f"{first_call_s:.1f} s) | recompute {row['recompute_step_ms']:.1f} ms/step "
        f"(timed on {args.recompute_steps} steps) = {row['recompute_tokens_per_s']:.1f} tokens/s"
        f" | speed-up {row['speedup']:.1f}x; same greedy tokens on {agree:.0%} of the timed steps",
        flush=True,
    )
    return [row]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="attention,layer,decode")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block-sizes", default="128,64", help="sparse_attention block sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--decode-width", type=int, default=256)
    parser.add_argument("--decode-layers", type=int, default=4)
    parser.add_argument("--decode-heads", type=int, default=4)
    parser.add_argument("--decode-batch", type=int, default=1)
    parser.add_argument("--decode-vocab", default="16384/8192", help="text / image vocabulary")
    parser.add_argument("--decode-repeats", type=int, default=3)
    parser.add_argument("--recompute-steps", type=int, default=16)
    add_allocator_flag(parser)
    args = parser.parse_args()
    allocator = use_retaining_malloc(args.system_malloc)
    parts = args.parts.split(",")

    import torch

    torch.set_num_threads(args.threads)
    print(
        f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, jax {jax.__version__}; {allocator}",
        flush=True,
    )
    ceiling = matmul_ceiling()
    print(f"fp32 matmul ceiling: {ceiling / 1e9:.0f} GFLOP/s", flush=True)
    if "attention" in parts:
        attention_rows(
            [int(b) for b in args.block_sizes.split(",")], args.repeats, args.settle, ceiling
        )
    if "layer" in parts:
        layer_rows(args.repeats, args.settle, ceiling)
    if "decode" in parts:
        decode_rows(args, args.settle)
    after = matmul_ceiling()
    print(f"fp32 matmul ceiling after: {after / 1e9:.0f} GFLOP/s", flush=True)


if __name__ == "__main__":
    main()
