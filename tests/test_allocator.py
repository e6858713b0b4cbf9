"""The allocator setting the exit trainer and the serving engine rely on to reuse freed buffers."""

import platform
import subprocess
import sys

import pytest

from familial.allocator import retain_freed_memory

glibc_only = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt thresholds are glibc's")


@glibc_only
def test_glibc_accepts_the_thresholds():
    assert retain_freed_memory() is True


FAULTS_OF_GROWING_BUFFERS = """
import resource, sys, torch
if sys.argv[1] == "engine":
    from familial.config import FamilyConfig
    from familial.infer import Engine
    from familial.model import FamilyModel
    Engine(FamilyModel(FamilyConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, exits=[0, 1])))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
# A step's activations: freed, then allocated again a little larger (another prompt chunk).
for megabytes in range(8, 24):
    torch.ones(megabytes << 18)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@glibc_only
def test_a_cpu_engine_reuses_freed_memory():
    """glibc's defaults map every buffer above the largest freed so far afresh and fault it in
    page by page; in a process with a CPU engine, the heap keeps what was freed."""
    faults = {}
    for process in ("plain", "engine"):
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_GROWING_BUFFERS, process], capture_output=True,
                              text=True, check=True)
        faults[process] = int(done.stdout.split()[-1])
    assert faults["engine"] * 3 < faults["plain"], faults
