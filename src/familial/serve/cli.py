"""`familial serve FAMILY`: the OpenAI-compatible server and playground for every member."""

from __future__ import annotations

import argparse
from pathlib import Path

from familial.config import ConfigError


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory (with tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="sequences decoded together (KV cache slots)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot before new ones get 429")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt plus answer tokens per request (default: the model's, at most 4096)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and KV cache precision (default: the checkpoint's)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (default: 1 for small families, else torch's)")


def run(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from familial.infer.engine import Engine, suggested_threads
    from familial.serve.app import create_app
    from familial.chat_template import ChatTemplate

    family = Path(args.family)
    if not (family / "tokenizer.json").exists():
        raise ConfigError(f"{family}: no tokenizer.json; the server needs the family's tokenizer "
                          f"to read prompts and write answers")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected a port number in 1..65535")
    engine = Engine.from_checkpoint(family, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                                    max_seq_len=args.max_seq_len, device=args.device,
                                    dtype=args.dtype)
    threads = args.threads or suggested_threads(engine.config)
    if threads:
        torch.set_num_threads(threads)
    app = create_app(engine, engine.tokenizer, ChatTemplate.from_directory(family))
    engine.start()
    try:
        print(f"serving {family} ({', '.join(m['id'] for m in engine.members())}) on "
              f"http://{args.host}:{args.port}/ (playground), OpenAI API at /v1", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0
