"""Runs a command as N JAX processes on this machine, as a pod or cluster would run it.

    python -m jaxaigc.launch 2 -- -m jaxaigc train lm --workdir runs/lm2

Each process gets ``--coordinator_address=localhost:<free port> --num_processes=N
--process_id=i`` after the command's own arguments, and ``--devices_per_process`` CPU devices
(``XLA_FLAGS``); collectives between processes go over gloo. SIGTERM or SIGINT to the launcher
reaches every process (a preemption). When a process dies with a non-zero status the others are
killed, as SLURM's ``srun --kill-on-bad-exit`` does: they would otherwise wait in a collective
for the dead one until JAX's heartbeat timeout. The exit status is 128 + the signal of a process
killed by one, else the status of the first process seen failing, else 0.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
    """The environment with ``devices`` host-platform CPU devices and the CPU backend."""
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
    )
    return {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
        "JAX_PLATFORMS": "cpu",
    }


def launch(
    num_processes: int, command: list[str], *, devices_per_process: int = 1, poll_s: float = 0.1
) -> int:
    """Runs ``command`` (Python's arguments: a script or ``-m module``, then theirs) as
    ``num_processes`` processes; returns the exit status described in the module docstring."""
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"need at least one process and one device each, got {num_processes} processes of "
            f"{devices_per_process} devices"
        )
    address = f"localhost:{free_port()}"
    env = process_env(devices_per_process)
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                *command,
                f"--coordinator_address={address}",
                f"--num_processes={num_processes}",
                f"--process_id={i}",
            ],
            env=env,
        )
        for i in range(num_processes)
    ]

    def forward(signum, frame):
        for p in processes:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [p.poll() for p in processes]
            failures = [c for c in codes if c not in (None, 0)]
            if failures:
                # A process killed by a signal is the cause; the others' errors follow from it.
                failed = min(failures, key=lambda code: code > 0)
                for p in processes:
                    if p.poll() is None:
                        p.kill()
                for p in processes:
                    p.wait()
                return 128 - failed if failed < 0 else failed
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python -m jaxaigc.launch N [--devices_per_process D] -- PYTHON_ARGS ...",
    )
    parser.add_argument("num_processes", type=int)
    parser.add_argument("--devices_per_process", type=int, default=1)
    argv = sys.argv[1:]
    if "--" not in argv:
        parser.error("put -- before what python runs, e.g. -- -m jaxaigc train lm --workdir W")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1 :]
    sys.exit(launch(args.num_processes, command, devices_per_process=args.devices_per_process))


if __name__ == "__main__":
    main()
