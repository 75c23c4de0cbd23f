"""`agent run` caps glibc's malloc arenas (one per worker thread otherwise) at 2."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Starts 8 threads that each allocate (their first malloc takes a new arena while under the
# cap), then prints glibc's malloc_stats, one "Arena N:" block per arena, on stderr.
PROGRAM = """
import ctypes, sys, threading
from agent import cli
if sys.argv[1] == "cap":
    cli._cap_malloc_arenas()
hold = []
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    hold.append([bytearray(100_000) for _ in range(20)])
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()
"""


def arenas(mode: str, env: dict[str, str]) -> int:
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], env=env, capture_output=True,
                          text=True, check=True)
    return sum(line.startswith("Arena ") for line in done.stderr.splitlines())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(M_ARENA_MAX) is glibc's")
def test_agent_run_caps_malloc_arenas_unless_the_environment_says() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert arenas("plain", env) > 2  # the measure works: threads do take arenas of their own
    assert arenas("cap", env) <= 2
    assert arenas("cap", {**env, "MALLOC_ARENA_MAX": "4"}) > 2  # the operator's word wins
