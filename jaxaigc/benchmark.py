"""What the benchmarks (`jaxaigc bench NAME`) share: medians of timed calls, the matmul ceiling
they are measured against, the allocator settings they run under, their PyTorch peers, FLOPs
counted in the compiled program and the time ``jaxaigc plan`` predicts, and the suite's runner
(one process per part with its own time limit, rows written to JSONL and markdown as each part
ends)."""

import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

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


# --- PyTorch peers, loaded from their distributions -----------------------------------------


def openai_clip_module():
    """OpenAI's ``clip/model.py``, imported by path from the installed ``openai-clip`` distribution
    (``clip/__init__`` needs torchvision, and ``import clip`` from experiments/bench finds the
    benchmark's own clip.py)."""
    try:
        distribution = importlib.metadata.distribution("openai-clip")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "openai-clip is not installed: pip install --no-deps openai-clip==1.0.1"
        ) from None
    return _module_from_path("openai_clip_model", Path(distribution.locate_file("clip/model.py")))


def openai_clip_step(torch, model, images, tokens, optimizer, autocast, sync) -> Callable[[], None]:
    """One training step of OpenAI's CLIP ``model`` (torch) on ``images`` and ``tokens``: the
    symmetric cross-entropy of the library's CLIP loss, the logits in float32 under ``autocast``,
    then ``sync()`` (a device synchronisation, so that a timer sees the step)."""
    labels = torch.arange(len(images), device=images.device)

    def step():
        model.train()
        with autocast():
            per_image, per_text = model(images, tokens)
            loss = (
                torch.nn.functional.cross_entropy(per_image.float(), labels)
                + torch.nn.functional.cross_entropy(per_text.float(), labels)
            ) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()

    return step


def dalle_pytorch_attention():
    """DALLE-pytorch's ``attention.py``, loaded by path: its package ``__init__`` imports the whole
    model (and dependencies not installed here). The file imports ``apply_rotary_emb`` at the
    top, used only with rotary embeddings, which the benchmarks do not pass: a stub stands in."""
    spec = importlib.util.find_spec("dalle_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "dalle-pytorch is not installed: pip install --no-deps dalle-pytorch"
        )
    if importlib.util.find_spec("rotary_embedding_torch") is None:
        stub = types.ModuleType("rotary_embedding_torch")
        stub.apply_rotary_emb = None
        sys.modules["rotary_embedding_torch"] = stub
    path = Path(spec.submodule_search_locations[0]) / "attention.py"
    module = _module_from_path("dalle_pytorch_attention", path)
    # Its forward scales q in place (``q *= self.scale``) on a view of ``to_qkv(x).chunk(3)``,
    # which PyTorch's autograd rejects ("a view ... of a function that returns multiple views"):
    # as released, the layer runs forward only. Copying the three heads-split projections makes
    # them views of nothing; the layer's arithmetic is unchanged.
    rearrange = module.rearrange

    def rearrange_copying_qkv(tensor, pattern, **axes):
        out = rearrange(tensor, pattern, **axes)
        return out.clone() if pattern == "b n (h d) -> (b h) n d" else out

    module.rearrange = rearrange_copying_qkv
    return module


def clip_inputs(config, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """A CLIP batch for ``config`` (a ``CLIPConfig``): normalised-looking NHWC images and token
    rows ending in EOT (the largest id), zero-padded."""
    rng = np.random.default_rng(0)
    r = config.image_resolution
    images = rng.normal(size=(batch, r, r, 3)).astype(np.float32)
    tokens = rng.integers(1, config.vocab_size - 2, (batch, config.context_length))
    lengths = rng.integers(5, config.context_length, batch)
    tokens[np.arange(batch), lengths] = config.vocab_size - 1
    tokens[np.arange(config.context_length)[None, :] > lengths[:, None]] = 0
    return images, tokens.astype(np.int32)


def _module_from_path(name: str, path: Path):
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# --- FLOPs and the time plan predicts --------------------------------------------------------

# jax's device_kind -> jaxaigc.plan.CHIPS key (the first substring found, in this order).
_PLAN_CHIPS = {
    "H100": "h100",
    "H200": "h200",
    "TPU v4": "tpu-v4",
    "TPU v5 lite": "tpu-v5e",
    "TPU v5": "tpu-v5p",
    "TPU v6 lite": "tpu-v6e",
}


def counted_flops(fn: Callable, *args, compiled: jax.stages.Compiled | None = None) -> float:
    """Multiply-add FLOPs of ``fn(*args)``: :func:`jaxaigc.plan.hlo_flops` (every dot and
    convolution, each loop body times its trip count) of the program XLA:CPU compiles. That is
    ``compiled``'s own text when it is a CPU program; otherwise ``fn`` is compiled again for the
    CPU on abstract ``args``, since an accelerator's program hands its matmuls and convolutions to
    library calls (cuBLAS, cuDNN) that the count cannot read. The count is the same on any backend.
    """
    from jaxaigc.plan import hlo_flops

    if compiled is None or jax.default_backend() != "cpu":
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args
        )
        compiled = jax.jit(fn).lower(*abstract).compile()
    return hlo_flops(compiled.as_text())


def predicted_seconds(flops: float, device_kind: str, ceiling: float) -> tuple[float, str]:
    """``(seconds, basis)``: ``jaxaigc plan``'s step time for ``flops`` on this chip (its
    ``MFU`` of the vendor's peak) where plan knows the chip, else ``flops / ceiling`` (the
    measured matmul ceiling: plan predicts no time for other devices)."""
    from jaxaigc import plan

    key = next((key for kind, key in _PLAN_CHIPS.items() if kind in device_kind), None)
    if key is None:
        return flops / ceiling, "FLOPs / measured ceiling (plan knows no such chip)"
    chip = plan.CHIPS[key]
    basis = f"plan: {plan.MFU:.0%} of {chip.name}'s {chip.peak_flops / 1e12:.0f} TFLOP/s"
    return flops / (chip.peak_flops * plan.MFU), basis


# --- The suite: a process per part, each part's rows written as it ends ----------------------

ROW_PREFIX = "BENCH_ROW "


def report_row(row: str, **fields) -> None:
    """Prints figures of ``row`` for the suite's parent process, as soon as each is known: a part
    killed at its time limit keeps the figures it printed. Later fields add to earlier ones."""
    print(ROW_PREFIX + json.dumps({"row": row, **fields}), flush=True)


@dataclasses.dataclass
class PartResult:
    """What one part's process reported: its rows' merged fields by name, how it ended
    (``"ok"``, ``"timed out at S s"``, ``"exit N: last line"``) and its wall time."""

    rows: dict[str, dict]
    status: str
    seconds: float


def run_part(
    command: Sequence[str], timeout: float, log: Path, env: dict[str, str] | None = None
) -> PartResult:
    """Runs one part's ``command`` in a session of its own, its output appended to ``log``; at
    ``timeout`` seconds the session is killed (compiler threads and all), so a slow compile
    costs that part only. Returns the rows the part reported with :func:`report_row`."""
    start = time.perf_counter()
    offset = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as f:
        f.write(f"\n=== {shlex.join(command)} (limit {timeout:g} s)\n".encode())
        f.flush()
        process = subprocess.Popen(
            command, stdout=f, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        try:
            code = process.wait(timeout=timeout)
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"timed out at {timeout:g} s"
    lines = log.read_bytes()[offset:].decode(errors="replace").splitlines()
    rows: dict[str, dict] = {}
    for line in lines:
        if line.startswith(ROW_PREFIX):
            fields = json.loads(line[len(ROW_PREFIX) :])
            rows.setdefault(fields["row"], {}).update(fields)
    if status.startswith("exit"):
        said = [line for line in lines[1:] if line.strip() and not line.startswith(ROW_PREFIX)]
        status += f": {said[-1].strip()}" if said else ""
    return PartResult(rows, status, time.perf_counter() - start)


def environment(command: str) -> dict[str, str]:
    """The suite's header without starting a backend: date, command, package versions, the GPU
    driver (``nvidia-smi``, where present) and the host's CPUs."""
    header = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
    }
    for package in ("jax", "jaxlib", "flax", "optax", "torch"):
        try:
            header[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            header[package] = "not installed"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total"]
        query.append("--format=csv,noheader")
        done = subprocess.run(query, capture_output=True, text=True)
        header["driver"] = done.stdout.strip() or done.stderr.strip()
    else:
        header["driver"] = "no nvidia-smi"
    header["host"] = f"{os.cpu_count()} CPUs"
    return header


_COLUMNS = (
    "part", "row", "shape", "GFLOP", "ms", "of ceiling", "predicted ms", "peer", "peer ms",
    "ours / peer", "tokens/s (ours / peer)", "compile s", "status",
)  # fmt: skip


def complete_row(fields: dict, ceiling: float | None, device_kind: str) -> dict:
    """A part's row with the figures derived from the run's ceiling: the fraction of it, the
    predicted time (:func:`predicted_seconds`), the ratio to the peer and tokens per second."""
    row = dict(fields)
    flops, seconds, peer_s = row.get("flops"), row.get("seconds"), row.get("peer_seconds")
    if flops and seconds and ceiling:
        row["fraction"] = flops / seconds / ceiling
    if flops and ceiling:
        row["predicted_seconds"], row["predicted_basis"] = predicted_seconds(
            flops, device_kind, ceiling
        )
    if seconds and peer_s:
        row["vs_peer"] = seconds / peer_s
    if row.get("tokens"):
        for key, time_key in (("tokens_per_s", "seconds"), ("peer_tokens_per_s", "peer_seconds")):
            if row.get(time_key):
                row[key] = row["tokens"] / row[time_key]
    return row


def _markdown_row(row: dict) -> str:
    def number(key: str, scale: float = 1.0, digits: int = 1) -> str:
        value = row.get(key)
        return "" if value is None else f"{value * scale:,.{digits}f}"

    tokens = " / ".join(
        number(key, digits=0) or "-" for key in ("tokens_per_s", "peer_tokens_per_s")
    )
    shape = row.get("shape", "")
    if row.get("params"):
        shape += f", {row['params'] / 1e6:,.1f}M parameters"
    cells = (
        row["part"], row.get("row", ""), shape, number("flops", 1e-9),
        number("seconds", 1e3), number("fraction", digits=2), number("predicted_seconds", 1e3),
        row.get("peer", ""), number("peer_seconds", 1e3), number("vs_peer", digits=2),
        tokens if row.get("tokens") else "", number("compile_seconds"), row["status"],
    )  # fmt: skip
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


class SuiteTable:
    """The suite's output in ``out``: ``suite.jsonl`` (a header record, then one record per row)
    and ``suite.md`` (the header as a list, then a table), appended as each part ends."""

    def __init__(self, out: Path, header: dict):
        self.jsonl, self.markdown = out / "suite.jsonl", out / "suite.md"
        with open(self.jsonl, "w") as f:
            f.write(json.dumps({"header": header}) + "\n")
        lines = [f"- {key}: {value}" for key, value in header.items()]
        lines += ["", "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        self.markdown.write_text("\n".join(lines) + "\n")

    def add(self, part: str, result: PartResult, ceiling: float | None, device_kind: str) -> None:
        """Writes ``part``'s rows (one row saying how it ended if it reported none)."""
        rows = result.rows.values() or [{"row": ""}]
        with open(self.jsonl, "a") as jsonl, open(self.markdown, "a") as markdown:
            for fields in rows:
                row = complete_row(fields, ceiling, device_kind)
                row |= {"part": part, "status": result.status, "part_seconds": result.seconds}
                jsonl.write(json.dumps(row) + "\n")
                markdown.write(_markdown_row(row) + "\n")
