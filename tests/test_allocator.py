"""retain_freed_memory: a freed large tensor's pages are reused, not faulted in again."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")

SCRIPT = """
import resource, sys, torch
from purchase_intent.allocator import retain_freed_memory
active = retain_freed_memory() if sys.argv[1] == "on" else False
def faults_of_one_fill():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_fill()  # first touch always faults
print(int(active), min(faults_of_one_fill() for _ in range(3)))
"""


def _run(mode: str, env_off: bool = False) -> tuple[int, int]:
    import os

    env = {**os.environ, "PURCHASE_INTENT_RETAIN_HEAP": "0" if env_off else "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    active, faults = out.stdout.split()
    return int(active), int(faults)


def test_retained_heap_reuses_pages():
    active, faults = _run("on")
    if not active:
        pytest.skip("not glibc: mallopt unavailable")
    _, faults_default = _run("off")
    if faults_default < 4_000:  # 64 MiB is 16k pages of 4 KiB; far fewer faults means huge pages
        pytest.skip(f"the default allocator faulted only {faults_default} times (transparent huge pages)")
    assert faults < faults_default / 10


def test_env_turns_it_off():
    active, _ = _run("on", env_off=True)
    assert active == 0
