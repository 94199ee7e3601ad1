"""Timing helpers shared by the benchmarks (imported from the scripts beside this file)."""

import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def median_times(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Median seconds of each zero-argument ``fn`` (which must block until done), after a
    warm-up call. The functions take turns in every repeat, so a load change on a shared machine
    hits all of them alike."""
    for fn in fns:
        fn()  # warm-up (and compilation)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def matmul_ceiling(n: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` jitted fp32 [n, n] @ [n, n]: this machine's practical
    matmul ceiling, against which the benchmarks report the fraction they achieve."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
