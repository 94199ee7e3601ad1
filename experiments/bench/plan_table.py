"""Every preset of ``jaxaigc plan`` on its smallest fitting mesh, as a markdown table.

    python experiments/bench/plan_table.py [--chip h100] [--presets RN50,gpt2-xl] [--timeout 900]

Each preset is planned at its paper's global batch on 8 devices (fsdp 8); the smallest fsdp size
estimated to fit the chip (``jaxaigc.plan.fit``) is then planned itself, doubling until XLA's
peak fits (halving while it still fits below 8). One ``jaxaigc plan`` process per mesh; rows are
printed as they finish.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from jaxaigc.plan import CHIPS, GIB, TARGETS


def plan_json(name: str, devices: int, chip: str, timeout: float) -> dict:
    command = [sys.executable, "-m", "jaxaigc", "plan", name, "--devices", str(devices)]
    command += ["--mesh", "fsdp=-1", "--chip", chip, "--json"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{devices} devices: compile timed out after {timeout:.0f} s"}
    if done.returncode:
        return {"error": f"{devices} devices: {done.stderr.strip().splitlines()[-1]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def smallest_fitting(name: str, chip: str, timeout: float) -> tuple[dict, dict[int, dict]]:
    """The plan on the fewest devices (a power of 2) whose peak fits ``chip``, and every plan
    made on the way by device count."""
    plans: dict[int, dict] = {}

    def at(devices: int) -> dict:
        if devices not in plans:
            plans[devices] = plan_json(name, devices, chip, timeout)
        return plans[devices]

    def fits(devices: int) -> bool:
        return "error" not in at(devices) and at(devices)["fits"]

    if "error" in at(8):
        return at(8), plans
    devices = at(8)["smallest_fsdp"] or 8
    while not fits(devices):
        if "error" in at(devices):
            return at(devices), plans
        devices *= 2
        if devices > 1024:
            return {"error": "no mesh up to 1,024 devices fits"}, plans
    while devices > 1 and fits(devices // 2):
        devices //= 2
    return at(devices), plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chip", default="h100", choices=sorted(CHIPS))
    presets = [name for name, target in TARGETS.items() if target.preset]
    parser.add_argument("--presets", default=",".join(presets))
    parser.add_argument("--timeout", type=float, default=900, help="seconds per compile")
    args = parser.parse_args()
    chip = CHIPS[args.chip]
    print(
        f"Smallest fsdp mesh whose XLA:CPU peak fits {chip.name} ({chip.hbm_bytes / GIB:.0f} GiB); "
        f"step time at 40% of {chip.peak_flops / 1e12:.0f} TFLOP/s\n"
    )
    print(
        "| preset | step | params | batch | devices | FLOPs/step | per example (per token) "
        "| GiB/device: args / temps / peak | step s at 40% MFU | peaks tried (devices: GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.presets.split(","):
        result, plans = smallest_fitting(name, args.chip, args.timeout)
        tried = ", ".join(
            f"{n}: {p['peak'] / GIB:.1f}" if "error" not in p else f"{n}: error"
            for n, p in sorted(plans.items())
        )
        target = TARGETS[name]
        if "error" in result:
            print(f"| {name} | {target.recipe} {target.step} | | | | | | | | {result['error']} |")
            continue
        r = result
        per = f"{r['flops_per_example']:.2e}"
        if r["flops_per_token"]:
            per += f" ({r['flops_per_token']:.2e})"
        print(
            f"| {name} | {r['recipe']} {r['step']} | {r['params'] / 1e6:,.0f}M | {r['batch']:,} "
            f"| {r['devices']} | {r['flops']:.2e} | {per} | {r['argument'] / GIB:.1f} / "
            f"{r['temp'] / GIB:.1f} / {r['peak'] / GIB:.1f} | {r['step_seconds_at_mfu']:.2f} | "
            f"{tried} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
