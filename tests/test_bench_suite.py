"""The benchmark suite (``jaxaigc bench suite``): a part killed at its time limit costs its rows
only and keeps the figures it printed, the FLOP count multiplies loop bodies by their trips, and
the whole suite runs at CPU size."""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxaigc import benchmark, plan

ROOT = Path(__file__).parents[1]

CHILD = """
import sys, time
from jaxaigc.benchmark import report_row
report_row("step", shape="tiny")
report_row("step", seconds=0.5, flops=1e9)
if sys.argv[1] == "slow":
    time.sleep(60)
    report_row("step", peer_seconds=1.0)
if sys.argv[1] == "fails":
    raise ValueError("no such preset 'B/17'")
"""


@pytest.mark.parametrize(
    "mode, status",
    [("done", "ok"), ("slow", "timed out at 8 s"), ("fails", "exit 1: ValueError: no such preset")],
)
def test_a_part_keeps_the_figures_it_printed(tmp_path, mode, status):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    log = tmp_path / "suite.log"
    start = time.perf_counter()
    result = benchmark.run_part([sys.executable, str(script), mode], 8, log)
    assert time.perf_counter() - start < 20  # killed at its limit, not after the sleep
    assert result.status.startswith(status)
    assert result.rows == {"step": {"row": "step", "shape": "tiny", "seconds": 0.5, "flops": 1e9}}
    assert f"child.py {mode} (limit 8 s)" in log.read_text()


def test_the_table_derives_fractions_ratios_and_predictions(tmp_path):
    table = benchmark.SuiteTable(tmp_path, {"device": "1 x NVIDIA H100 80GB HBM3", "jax": "0"})
    rows = {
        "sample": dict(row="sample", flops=4e12, seconds=2.0, peer_seconds=8.0, tokens=1000),
        "step": dict(row="step", seconds=1.0),  # killed before its FLOPs were counted
    }
    table.add("part", benchmark.PartResult(rows, "timed out at 9 s", 10.0), 4e12, "H100")
    header, sample, step = (json.loads(line) for line in table.jsonl.read_text().splitlines())
    assert header == {"header": {"device": "1 x NVIDIA H100 80GB HBM3", "jax": "0"}}
    assert sample["fraction"] == 0.5 and sample["vs_peer"] == 0.25
    assert sample["tokens_per_s"] == 500 and sample["peer_tokens_per_s"] == 125
    assert sample["predicted_seconds"] == 4e12 / (plan.CHIPS["h100"].peak_flops * plan.MFU)
    assert sample["predicted_basis"].startswith("plan: 40% of NVIDIA H100")
    assert step["status"] == "timed out at 9 s" and "fraction" not in step
    lines = table.markdown.read_text().splitlines()
    assert lines[0] == "- device: 1 x NVIDIA H100 80GB HBM3"
    assert lines[-2] == (
        "| part | sample |  | 4,000.0 | 2,000.0 | 0.50 | 10.1 |  | 8,000.0 | 0.25 | 500 / 125 |  "
        "| timed out at 9 s |"
    )
    assert lines[-1].endswith("| timed out at 9 s |")


def test_without_a_chip_plan_knows_the_prediction_is_flops_over_the_ceiling():
    seconds, basis = benchmark.predicted_seconds(6e9, "cpu", 3e9)
    assert seconds == 2.0 and basis.startswith("FLOPs / measured ceiling")


def test_counted_flops_multiply_a_loop_body_by_its_trips():
    def fn(a, b):
        return jax.lax.fori_loop(0, 5, lambda i, x: jnp.tanh(x @ b), a)

    a, b = jnp.ones((8, 16)), jnp.ones((16, 16))
    expected = 5 * 2 * 8 * 16 * 16
    assert benchmark.counted_flops(fn, a, b) == expected  # compiled again for the CPU
    compiled = jax.jit(fn).lower(a, b).compile()
    assert benchmark.counted_flops(fn, a, b, compiled=compiled) == expected


def suite(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "jaxaigc", "bench", "suite", *map(str, args)],
        capture_output=True, text=True, cwd=ROOT, timeout=timeout,
    )  # fmt: skip


def test_jaxaigc_bench_passes_help_to_the_suite():
    result = suite("--help", timeout=120)
    assert result.returncode == 0 and "usage: jaxaigc bench suite [-h] [--parts" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--parts", "clip-vit-b16,clip-b99"], "--parts: unknown ['clip-b99']"),
        (["--part-timeout", "60,gpt-ppo=soon"], "'gpt-ppo=soon' is not SECONDS or PART=SECONDS"),
        (["--part-timeout", "gpt-ppo=60"], "no limit for ceiling, clip-rn50"),
    ],
)
def test_bad_arguments_are_named_before_any_part_runs(tmp_path, args, message):
    result = suite(*args, "--out", tmp_path, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert not (tmp_path / "suite.log").exists()


@pytest.mark.slow
def test_the_suite_at_cpu_size_writes_each_part_as_it_ends_and_a_timeout_costs_its_part_only(
    tmp_path,
):
    # One part of each kind: a train step, a sampler (tokens/s), two PyTorch peers, and the RN50
    # part stopped at 1 s, long before its first figure. The whole suite at this size takes ~5
    # minutes on 2 shared cores (~25 s of compilation per part): `jaxaigc bench suite --size cpu`.
    parts = ["gpt-ppo", "clip-rn50", "dalle-sample", "dalle-layer", "gpt-rollout"]
    result = suite(
        "--size", "cpu", "--parts", ",".join(parts), "--out", tmp_path,
        "--part-timeout", "300,clip-rn50=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (tmp_path / "suite.jsonl").read_text().splitlines()
    header, *rows = (json.loads(line) for line in lines)
    assert header["header"]["device"].endswith(" x cpu") and header["header"]["size"] == "cpu"
    assert header["header"]["command"].startswith("jaxaigc bench suite --size cpu --parts")
    assert [row["part"] for row in rows] == ["ceiling", *parts]
    timed_out, finished = rows[2], rows[:2] + rows[3:]
    assert timed_out["status"] == "timed out at 1 s" and "seconds" not in timed_out
    for row in finished:
        assert row["status"] == "ok", row
        assert row["flops"] > 0 and row["seconds"] > 0 and 0 < row["fraction"] < 2, row
        assert row["predicted_basis"].startswith("FLOPs / measured ceiling")
    layer, rollout = rows[-2:]
    # DALLE-pytorch is optional (pip install --no-deps dalle-pytorch): without it, the row says so.
    assert layer["peer"].startswith("DALLE-pytorch SparseAxialCausalAttention")
    assert ("peer_seconds" in layer) == (importlib.util.find_spec("dalle_pytorch") is not None)
    assert rollout["tokens"] == 4 * 16 and rollout["tokens_per_s"] > 0
    assert rollout["peer"] == "transformers GPT-2 generate" and rollout["peer_tokens_per_s"] > 0
    table = (tmp_path / "suite.md").read_text()
    assert table.count("\n| ") == 1 + len(rows)  # the column names, then a line per row
