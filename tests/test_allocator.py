"""retained_heap: inside it a freed large tensor's pages are reused, not faulted in again; after it
the memory goes back to the system."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")

SCRIPT = """
import contextlib, resource, sys, torch
from purchase_intent.allocator import retained_heap
def faults(f):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 2**20
block = retained_heap() if sys.argv[1] == "on" else contextlib.nullcontext(False)
with block as active:
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, above glibc's largest mmap threshold: touched, freed
    reuse = faults(lambda: torch.empty(8 * 2**20).fill_(1.0))  # 32 MiB fits in the freed block
    inside = rss_mib()
print(int(bool(active)), reuse, inside - rss_mib())
"""


def _run(mode: str, env_off: bool = False) -> tuple[int, int, int]:
    env = {**os.environ, "PURCHASE_INTENT_RETAIN_HEAP": "0" if env_off else "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True)
    active, reuse, released = (int(x) for x in out.stdout.split())
    return active, reuse, released


def test_retained_heap_reuses_pages_then_gives_them_back():
    active, reuse, released = _run("on")
    if not active:
        pytest.skip("not glibc: mallopt unavailable")
    _, reuse_default, _ = _run("off")
    if reuse_default < 2_000:  # 32 MiB is 8k pages of 4 KiB; far fewer faults means huge pages
        pytest.skip(f"the default allocator faulted only {reuse_default} times (transparent huge pages)")
    assert reuse < reuse_default / 10
    assert released >= 48  # the retained 64 MiB left the process when the block ended


def test_env_turns_it_off():
    active, _, _ = _run("on", env_off=True)
    assert active == 0
