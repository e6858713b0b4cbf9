"""The runner's packed kernels against the model's own modules: one decoder layer, same weights.

A random decoder layer of --hidden (head dim 64, half as many KV heads, FFN 3x hidden) runs
a call of M rows (a decoding step of M sequences, or a prompt chunk of M tokens) through
`Kernels.layer` in mode "eager" (the module: `F.linear` on the weights as stored) and mode
"packed" (oneDNN on weights packed once; familial.infer.kernels), in float32 and, where the CPU
has bf16 instructions, bfloat16. CPU time on one thread (robust to other processes on a shared
machine), the two modes alternating, best of --repeats; the ratio is eager / packed (> 1: packed
is faster). Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from familial.config import FamilyConfig
from familial.infer.cache import SlotCache
from familial.infer.kernels import Kernels, packable
from familial.model import FamilyModel


def layer_time(kernels: Kernels, layer, x: torch.Tensor, rotary, batch, calls: int) -> float:
    started = time.process_time()
    for _ in range(calls):
        kernels.layer(layer, x, rotary, batch)
    return (time.process_time() - started) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and repeats")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 32, 512])
    parser.add_argument("--repeats", type=int, help="alternating measurements per mode (default 5, 3 with --quick)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    repeats = args.repeats or (3 if args.quick else 5)
    heads = args.hidden // 64
    config = FamilyConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                          num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                          head_dim=64, exits=[0], max_position_embeddings=1024)
    dtypes = [torch.float32] + ([torch.bfloat16] if packable(torch.device("cpu"), torch.bfloat16) else [])
    print(f"one decoder layer of hidden {args.hidden} ({heads}/{max(1, heads // 2)} heads, ffn {3 * args.hidden}); "
          f"CPU seconds on one thread, best of {repeats}", flush=True)
    figures = {"hidden": args.hidden, "rows": {}}
    for dtype in dtypes:
        model = FamilyModel(config).eval().to(dtype)
        layer = model.model.layers["0"]
        modes = {mode: Kernels(model, mode) for mode in ("eager", "packed")}
        table = model.rotary(torch.arange(1024)[None], dtype)
        for rows in args.rows:
            # A decoding step of `rows` sequences at position 200, or one prompt chunk of `rows` tokens.
            cache = SlotCache(config, max(rows, 1) if rows <= 32 else 1, 1024, dtype=dtype)
            batch = (cache.batch(list(range(rows)), [200] * rows, [1] * rows) if rows <= 32
                     else cache.batch([0], [0], [rows]))
            x, rotary = torch.randn(1, rows, args.hidden, dtype=dtype), batch.rotary(table)
            calls = max(1, (8 if args.quick else 32) // max(1, rows // 16))
            best = {}
            with torch.inference_mode():
                for _ in range(repeats):
                    for mode, kernels in modes.items():
                        seconds = layer_time(kernels, layer, x, rotary, batch, calls)
                        best[mode] = min(best.get(mode, seconds), seconds)
            ratio = best["eager"] / best["packed"]
            name = str(dtype).removeprefix("torch.")
            figures["rows"].setdefault(name, {})[str(rows)] = {
                "eager_ms": round(best["eager"] * 1e3, 3), "packed_ms": round(best["packed"] * 1e3, 3),
                "ratio": round(ratio, 2)}
            print(f"  {name:8} {rows:4} rows: eager {best['eager'] * 1e3:8.2f} ms, packed "
                  f"{best['packed'] * 1e3:8.2f} ms, {ratio:.2f}x", flush=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
