"""Run a test file's ranks as gloo processes on loopback (the distributed tests share this launcher).

Each rank runs ``python <script> <rank> <port> <out_dir>``; the script's ``__main__`` does the work and
leaves its results in ``out_dir``. One overall deadline for all ranks; a rank that fails or times out
fails the test with its log tail, and no process outlives the call.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

LOG_TAIL_CHARS = 4000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_ranks(script: str, world: int, out_dir: pathlib.Path, timeout_s: float, env_extra=None) -> float:
    """Start ``world`` ranks of ``script``, wait for all (``timeout_s`` in total); returns the seconds taken."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **(env_extra or {}),
           "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    port = free_port()
    start = time.monotonic()
    procs = {rank: subprocess.Popen([sys.executable, script, str(rank), str(port), str(out_dir)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)}
    failed = []
    try:
        for rank, p in procs.items():
            left = max(1.0, timeout_s - (time.monotonic() - start))
            try:
                log = p.communicate(timeout=left)[0]
            except subprocess.TimeoutExpired:
                failed.append(f"rank {rank}: timed out after {timeout_s} s")
                break
            if p.returncode != 0:
                failed.append(f"rank {rank}: exit {p.returncode}\n{log[-LOG_TAIL_CHARS:]}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert not failed, "\n".join(failed)
    return time.monotonic() - start
