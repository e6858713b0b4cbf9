"""The serving runner's own CPU kernels (csrc/cpu_ops.cpp), float32.

torch's fused attention (SDPA) serves a packed call badly: it wants one query length and one
key length for every row, so rows of different lengths read padding or pay a call each (a
decoding step: familial.infer.cache's `decode_runs`; every prompt chunk: a call per layer), it
runs a flash kernel blocked for long queries on 2-row queries, and the query/key norms, rotary
and cache writes before it are a dozen more element-wise calls per layer. `attention` does all
of that for every row of the call in one call per layer: norm and rotate each token's key and
write key and value into the cache, norm and rotate its queries, then attend each row causally
over its own slot's positions only, the query heads sharing a KV head reading each cached key
and value together (vLLM ships a CPU attention kernel of its own for the same reason).
`rms_norm` and `silu_mul` are the element-wise steps around the products in one pass each
(torch runs RMSNorm as five passes on CPU); `norm_rotate_` norms and rotates queries and keys in
place for a call that attends on torch's kernels (two rows in one slot).

They are compiled from source with torch's C++ extension builder (g++ and ninja, which the
package depends on) the first time a process needs them (10-25 s; cached under torch's
extension directory, so later processes load them in milliseconds), for the CPU they run on.
Without a compiler, or when the build fails, `load()` says why once and the runner keeps its
torch path: same outputs, slower.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"


def _cpu_tag() -> str:
    """The build is for this CPU's instruction set (-march=native): a cached build made on
    another CPU (a home directory shared between machines) must not be loaded here."""
    flags = ""
    if Path("/proc/cpuinfo").exists():
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


@functools.cache
def load() -> float | None:
    """Build (or load the cached build of) the kernels; the seconds it took, None when unavailable."""
    if not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available():
        return None
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        # torch's builder runs `ninja` from PATH; the pip package's copy is not on it unless the
        # environment is activated.
        try:
            import ninja
        except ImportError:
            pass
        else:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    start = time.perf_counter()
    try:
        cpp_extension.load(f"familial_native_{_cpu_tag()}", [str(SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as error:  # noqa: BLE001 - any build failure leaves the torch path running
        warnings.warn(f"familial: the native CPU kernels did not build ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[-1] if str(error).strip() else error}); "
                      "the engine runs torch's kernels instead", RuntimeWarning, stacklevel=2)
        return None
    return time.perf_counter() - start


def attention(qkv: torch.Tensor, qk_norm: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
              keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
              lengths: torch.Tensor, q_heads: int) -> torch.Tensor:
    """Rows of `lengths[i]` tokens laid end to end: qkv (tokens, (q_heads + 2 kv_heads) *
    head_dim) as the fused projection gives it; cos/sin (1, tokens, head_dim); keys/values the
    layer's cache buffers (slots, kv_heads, max_len, head_dim), row i written at positions
    starts[i].. of slots[i] (one row per slot) and attending causally over that slot's prefix;
    qk_norm the stacked q_norm/k_norm weights (one row per query head, then per key head) or
    None. Returns the attention output (tokens, q_heads * head_dim)."""
    return torch.ops.familial.attention(qkv, qk_norm, eps, cos, sin, keys, values, slots, starts, lengths, q_heads,
                                        keys.shape[-1] ** -0.5)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """familial.model.rms_norm for float32 x (..., hidden), in one pass."""
    return torch.ops.familial.rms_norm(x.contiguous(), weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """(rows, 2F) gate and up side by side -> (rows, F) silu(gate) * up, in one pass."""
    return torch.ops.familial.silu_mul(gate_up)


def norm_rotate_(heads: torch.Tensor, weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 count: int) -> None:
    """In place on contiguous heads (tokens, heads, head_dim): the first `count` heads of each
    token normed by `weight` (count, head_dim) (None: not normed) and rotated by cos/sin (1, tokens, head_dim)."""
    torch.ops.familial.norm_rotate_(heads, weight, eps, cos, sin, count)
