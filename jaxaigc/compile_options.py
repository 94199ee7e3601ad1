"""XLA:CPU compiler options measured faster for this library's workloads, and a jit that uses them.

Both sets hand fusions to YNNPACK (``xla_cpu_experimental_ynn_fusion_type``): dot fusions, a dot
with its elementwise neighbours (a 1x1 convolution is one). Training also hands it reductions
(BatchNorm and LayerNorm statistics, bias and norm gradients); inference does not, because with
them the CLIP RN50 encoder was ~8% slower. Neither uses YNNPACK's elementwise fusions, single dots
or convolutions, which were slower. On the 2-core CPU the training set made the CLIP RN50 step
~28% and the small GPT step ~30% faster than XLA's defaults, the inference set the RN50 encoder
~14%, with results equal up to float32 rounding (BUILD_NOTES, "CLIP benchmark, current figures").

On GPUs the training set lowers ``xla_gpu_autotune_level`` from XLA's 4 to 1: XLA still times
every candidate convolution and GEMM algorithm and keeps the fastest, but no longer fills each
candidate's buffers with random data, refills them between runs and checks every result against a
reference algorithm (levels 2, 3 and 4). CLIP RN50's training step (batch 256: 53 convolutions,
each forward and twice backward) was still autotuning after 4 minutes on an H200 (issue 35), and
those per-candidate passes over batch-sized buffers are the part of autotuning that level 1
drops. Unmeasured so far: ``experiments/bench/rn50_gpu_compile.py`` times the compile and the step
with XLA's defaults and with this set. Inference and TPUs compile with XLA's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
CPU_TRAINING_OPTIONS = {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
CPU_INFERENCE_OPTIONS = {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_DOT"}
GPU_TRAINING_OPTIONS = {"xla_gpu_autotune_level": "1"}


def _on_cpu(options: dict[str, str], platform: str) -> dict[str, str]:
    return dict(options) if platform == "cpu" else {}


def training_options(mesh: Mesh) -> dict[str, str]:
    """XLA options for a train step on ``mesh``: ``CPU_TRAINING_OPTIONS`` on CPU,
    ``GPU_TRAINING_OPTIONS`` on a GPU, else none."""
    platform = mesh.devices.flat[0].platform
    if platform in ("gpu", "cuda", "rocm"):
        return dict(GPU_TRAINING_OPTIONS)
    return _on_cpu(CPU_TRAINING_OPTIONS, platform)


def inference_options() -> dict[str, str]:
    """XLA options for inference on the default backend: ``CPU_INFERENCE_OPTIONS`` on CPU."""
    return _on_cpu(CPU_INFERENCE_OPTIONS, jax.default_backend())


def jit_inference(fn: Callable, **jit_kwargs) -> Callable:
    """``jax.jit(fn, **jit_kwargs)`` compiled with ``inference_options()``."""
    return jax.jit(fn, compiler_options=inference_options(), **jit_kwargs)


def apply_in_batches(fn: Callable, inputs: np.ndarray, batch_size: int) -> Any:
    """``fn(inputs)`` (an array or a tuple of arrays) computed ``batch_size`` rows at a time (in
    one call when there are fewer), the last batch padded with zeros so that a jitted ``fn``
    compiles for one shape. Dispatch is asynchronous: every batch is queued before the first
    result is read."""
    size = min(batch_size, len(inputs))
    if size == 0:
        return jax.tree.map(np.asarray, fn(inputs))
    outputs = []
    for start in range(0, len(inputs), size):
        chunk = inputs[start : start + size]
        if (pad := size - len(chunk)) > 0:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        outputs.append(fn(chunk))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[: len(inputs)], *jax.device_get(outputs))
