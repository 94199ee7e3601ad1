"""Timing helpers for the benchmarks (`jaxaigc bench NAME`): medians of timed calls, the matmul
ceiling they are measured against, and the allocator settings they run under."""

import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

# glibc hands XLA's per-execution temporary buffer (1.1 GB for a ViT-B/32 training step at batch 8)
# back to the kernel after every step (it is mmap-ed from a thread arena), so the next step takes
# ~270k fresh page faults: 10-30% of the step, worse when another framework's allocations
# interleave. One arena with high mmap/trim thresholds keeps the memory mapped between steps.
# Where the kernel reclaims cold pages proactively (DAMON, as on these VMs), 4 KiB pages left idle
# for the ~2 s of the other framework's turn are reclaimed anyway: the step that follows took 135k
# faults (+50% time) while PyTorch, whose allocator asks for huge pages, took none. glibc's
# ``hugetlb=1`` tunable asks for transparent huge pages for the heap too.
RETAINING_MALLOC = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "4000000000",
    "MALLOC_TRIM_THRESHOLD_": "8000000000",
    "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1",
}


def add_allocator_flag(parser) -> None:
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default allocator settings instead of RETAINING_MALLOC",
    )


def use_retaining_malloc(system_malloc: bool) -> str:
    """Re-executes this script with ``RETAINING_MALLOC`` in the environment (glibc reads it only
    at start-up) unless ``system_malloc`` or it is set already; returns the settings in words.
    Both frameworks of a benchmark run in the one process, so both get the same settings."""
    if system_malloc:
        return "glibc malloc defaults (--system-malloc)"
    if any(os.environ.get(k) != v for k, v in RETAINING_MALLOC.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **RETAINING_MALLOC})
    return "glibc malloc with " + " ".join(f"{k}={v}" for k, v in RETAINING_MALLOC.items())


def huge_page_megabytes() -> float | None:
    """This process's anonymous memory in transparent huge pages (MB), or None off Linux. Whether
    the kernel grants them varies with the host's memory fragmentation, and XLA:CPU's time with
    them (RN50 ``encode_image`` 296 ms with none, 269-275 with 0.2-1.6 GB at batch 8)."""
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    kilobytes = rollup.split("AnonHugePages:")[1].split()[0]
    return int(kilobytes) / 1e3


def median_times(
    fns: Sequence[Callable[[], object]], repeats: int, settle: float = 1.0
) -> list[float]:
    """Median seconds of each zero-argument ``fn`` (which must block until done), after a
    warm-up call. The functions take turns in every repeat, so a load change on a shared machine
    hits all of them alike. Each turn starts ``settle`` seconds after the previous one ended:
    thread pools keep spinning for a while after their work is done (OpenMP's default wait
    policy), and would otherwise take cores from whichever framework runs next. Each turn is two
    calls, and only the second is timed: the steady state of back-to-back steps, as in training.
    The first call of a turn pays for the other framework's turn in between: memory paged out
    while idle (+50% for a ViT-B/32 step after PyTorch's, from proactive reclaim) and caches."""
    for fn in fns:
        fn()  # warm-up (and compilation)
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times, strict=True):
            time.sleep(settle)
            fn()
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def matmul_ceiling(n: int = 4096, repeats: int = 5, dtype=jnp.float32) -> float:
    """FLOP/s of the best of ``repeats`` jitted [n, n] @ [n, n] in ``dtype``: this machine's
    practical matmul ceiling, against which the benchmarks report the fraction they achieve."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
