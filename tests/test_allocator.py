"""The allocator setting the exit trainer relies on to reuse freed logits buffers."""

import platform
import sys

import pytest

from familial.allocator import retain_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt thresholds are glibc's")
def test_glibc_accepts_the_thresholds():
    assert retain_freed_memory() is True
