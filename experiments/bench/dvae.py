"""Benchmark: dVAE encode and decode, jaxaigc (jitted, fp32) against OpenAI's dall_e (PyTorch).

    python experiments/bench/dvae.py [--size 256 --batch 1 --repeats 5 --threads N --system-malloc]

Both run the released model's shapes (n_hid 256, 2 blocks per group, vocab 8192) with the same
random weights on the same batch, on this machine's CPU; jax jitted by ``jit_inference``.
Encode = map pixels, encoder, argmax; decode = one-hot codes, decoder, unmapped sigmoid(mu).
Times are medians of interleaved repeats after a warm-up, with ``timing.RETAINING_MALLOC`` unless
``--system-malloc``. FLOPs come from XLA's cost analysis of the compiled functions; the ceiling is
the best time of a large jitted fp32 matmul measured in the same run, before and after the models.
"""

import argparse
import os

import jax
import numpy as np

from jaxaigc.benchmark import (
    add_allocator_flag,
    huge_page_megabytes,
    matmul_ceiling,
    median_times,
    use_retaining_malloc,
)
from jaxaigc.compile_options import jit_inference
from jaxaigc.convert.dvae import dvae_from_torch
from jaxaigc.models.dvae import decode, encode


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    add_allocator_flag(parser)
    args = parser.parse_args()
    allocator = use_retaining_malloc(args.system_malloc)

    import dall_e
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    t_encoder, t_decoder = dall_e.Encoder(), dall_e.Decoder()
    config, variables = dvae_from_torch(t_encoder.state_dict(), t_decoder.state_dict())
    images = np.random.default_rng(0).uniform(size=(args.batch, args.size, args.size, 3))
    images = images.astype(np.float32)

    jax_encode = jit_inference(lambda v, x: encode(config, v, x))
    jax_decode = jit_inference(lambda v, ids: decode(config, v, ids))
    ids = jax.block_until_ready(jax_encode(variables, images))
    flops = {
        "encode": jax_encode.lower(variables, images).compile().cost_analysis()["flops"],
        "decode": jax_decode.lower(variables, ids).compile().cost_analysis()["flops"],
    }

    def torch_encode(x):
        logits = t_encoder(dall_e.map_pixels(x))
        return logits.argmax(1)

    def torch_decode(t_ids):
        codes = torch.nn.functional.one_hot(t_ids, config.vocab_size).permute(0, 3, 1, 2)
        stats = t_decoder(codes.float())
        return dall_e.unmap_pixels(torch.sigmoid(stats[:, :3]))

    t_images = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    t_ids = torch.from_numpy(np.asarray(ids, np.int64))
    same = bool((torch_encode(t_images).numpy() == np.asarray(ids)).all())

    ceiling = matmul_ceiling()
    times = {
        "encode": median_times(
            [
                lambda: jax.block_until_ready(jax_encode(variables, images)),
                lambda: torch_encode(t_images),
            ],
            args.repeats,
        ),
        "decode": median_times(
            [
                lambda: jax.block_until_ready(jax_decode(variables, ids)),
                lambda: torch_decode(t_ids),
            ],
            args.repeats,
        ),
    }
    # Measured again after the models: the best of both is the ceiling (the machine may be shared).
    ceiling = max(ceiling, matmul_ceiling())

    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; torch threads: "
        f"{torch.get_num_threads()}; batch {args.batch} at {args.size} px; tokens match: {same}"
    )
    print(f"matmul ceiling (fp32 4096^3, jitted): {ceiling / 1e9:.1f} GFLOP/s")
    print(f"allocator: {allocator}; {huge_page_megabytes()} MB in huge pages at the end")
    print(
        f"{'stage':<8}{'GFLOP':>8}{'jax ms':>10}{'torch ms':>10}{'jax/torch':>11}"
        f"{'jax GFLOP/s':>13}{'jax/ceil':>10}{'torch/ceil':>12}"
    )
    for stage, (jax_s, torch_s) in times.items():
        f = flops[stage]
        print(
            f"{stage:<8}{f / 1e9:>8.1f}{jax_s * 1e3:>10.1f}{torch_s * 1e3:>10.1f}"
            f"{jax_s / torch_s:>11.2f}{f / jax_s / 1e9:>13.1f}{f / jax_s / ceiling:>10.2f}"
            f"{f / torch_s / ceiling:>12.2f}"
        )


if __name__ == "__main__":
    main()
