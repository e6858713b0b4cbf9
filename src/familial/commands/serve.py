"""`familial serve FAMILY`: the OpenAI-compatible server and playground for every member."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import math
import os
import signal
import socket
import sys
from pathlib import Path

from familial.commands import arguments
from familial.config import ConfigError, FamilyConfig
from familial.data.provenance import family_tokenizer

# Exit status when the engine process ends on its own: the server stops so that a supervisor
# (systemd, Kubernetes, docker --restart) starts it again with a fresh engine.
ENGINE_DIED = 3


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("family", help="family checkpoint directory (with tokenizer.json)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (loopback by default: only requests to localhost, "
                             "127.0.0.1 or [::1] are answered there)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="sequences decoded together (KV cache slots)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="requests waiting for a slot before new ones get 429")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="prompt plus answer tokens per request (default: the model's, at most 4096)")
    parser.add_argument("--max-prefill-tokens", type=int, default=512,
                        help="prompt tokens prefilled per engine step beside the decoding sequences (as "
                             "vLLM's --max-num-batched-tokens, 2048 on CPU): smaller stalls running streams "
                             "less and answers the shortest prompts of a burst sooner")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="weights and KV cache precision (default: the checkpoint's)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads of the engine process (default: one per core from hidden "
                             "512 up, else 1); the HTTP side runs in a process of its own beside it")
    parser.add_argument("--api-key", default=os.environ.get("FAMILIAL_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every /v1 route (default: "
                             "$FAMILIAL_API_KEY; /health and the playground page stay open)")
    parser.add_argument("--chat-template",
                        help="Jinja chat template file, or 'chatml', to use instead of the checkpoint's "
                             "(a family without one refuses chat completions)")
    parser.add_argument("--header-timeout", type=float, default=10.0,
                        help="seconds a client has to send a request's headers")
    parser.add_argument("--body-timeout", type=float, default=60.0,
                        help="seconds a client has to send a request's body")


@arguments(_serve_arguments)
def serve(args: argparse.Namespace) -> int:
    _require_serve_extras()
    from familial.serve.guard import ClientPolicy

    family = Path(args.family)
    if not family.is_dir():
        raise ConfigError(f"{family}: no such directory (expected a family checkpoint directory)")
    family_tokenizer(family)  # refuses a tokenizer.json other than the one family.json records
    if not (family / "tokenizer.json").exists():
        raise ConfigError(f"{family}: no tokenizer.json; the server needs the family's tokenizer "
                          f"to read prompts and write answers")
    _check_options(args, family)
    # Listen first: a bad --host or a taken port is reported before the model loads.
    sock, loopback = _listen(args.host, args.port)
    try:
        policy = ClientPolicy(api_key=args.api_key, loopback_only=loopback, header_timeout=args.header_timeout,
                              body_timeout=args.body_timeout)
        return _run_server(args, family, sock, policy)
    finally:
        sock.close()


def _check_options(args: argparse.Namespace, family: Path) -> None:
    """Refuse what the engine would fail on later (a traceback, or the OOM killer at the
    first request), naming the option, its value and what it takes."""
    if args.api_key is not None:
        if not args.api_key.strip():
            raise ConfigError("--api-key: the key is empty")
        bad = next((c for c in args.api_key if not " " < c <= "~"), None)
        if bad is not None:
            # HTTP clients (openai's, browsers) send only ASCII in headers: such a key locks everyone out.
            raise ConfigError(f"--api-key: {bad!r} is not a printable ASCII character; a key is sent in an "
                              f"HTTP header, which clients write in ASCII")
    for name in ("header_timeout", "body_timeout"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected a finite number of seconds > 0")
    for name in ("max_batch_size", "max_queue", "max_prefill_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: expected a whole number >= 1")
    positions = FamilyConfig.load(family).max_position_embeddings
    if args.max_seq_len is not None and not 1 < args.max_seq_len <= positions:
        raise ConfigError(f"--max-seq-len {args.max_seq_len}: expected 2..{positions} tokens (the family's "
                          f"max_position_embeddings in {family / 'family.json'})")
    _check_device(args.device)


def _check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: not a torch device; expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cpu":
        return
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available"):
        raise ConfigError(f"--device {device}: this server runs on cpu, cuda or mps devices")
    if not backend.is_available():
        raise ConfigError(f"--device {device}: no {parsed.type} device is available to torch here")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise ConfigError(f"--device {device}: this machine has {count} {parsed.type} device(s), "
                          f"numbered from 0")


def _run_server(args: argparse.Namespace, family: Path, sock: socket.socket, policy) -> int:
    from familial.infer.process import EngineProcess
    from familial.serve.app import create_app
    from familial.serve.guard import uvicorn_server

    template = _chat_template(family, args.chat_template)
    engine = EngineProcess(family, threads=args.threads, max_batch_size=args.max_batch_size,
                           max_queue=args.max_queue, max_seq_len=args.max_seq_len,
                           max_prefill_tokens=args.max_prefill_tokens, device=args.device, dtype=args.dtype)
    app = create_app(engine, engine.tokenizer, template, policy)
    server = uvicorn_server(app, policy)
    host = f"[{args.host}]" if ":" in args.host else args.host
    if template is None:
        print(f"note: {family} has no chat template, so /v1/chat/completions answers 400; "
              f"pass --chat-template FILE (or chatml) to serve chat", flush=True)
    if not policy.loopback_only and policy.api_key is None:
        print(f"note: listening on {args.host} without --api-key: anyone who can reach this address can "
              f"use the API", flush=True)
    died: list[str] = []

    def engine_ended(reason: str) -> None:
        # On the engine's reader thread: uvicorn's loop sees should_exit within 0.1 s.
        died.append(reason)
        print(f"error: {reason}; the server stops (exit status {ENGINE_DIED}) so that a supervisor can "
              f"start it again", file=sys.stderr, flush=True)
        server.should_exit = True

    engine.on_end(engine_ended)
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again with the
    # handlers it found: SIGTERM's default would end this process before the engine's does.
    signal.signal(signal.SIGTERM, _terminated)
    try:
        print(f"serving {family} ({', '.join(m['id'] for m in engine.members())}) on "
              f"http://{host}:{args.port}/ (playground), OpenAI API at /v1; the engine runs in its own "
              f"process with {engine.threads} threads on {engine.kernels} (warmed up in {engine.warm_up_s:.1f} s)",
              flush=True)
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        engine.stop()
    return ENGINE_DIED if died else 0


class _Terminated(Exception):
    """SIGTERM, raised again by uvicorn once it has shut down."""


def _terminated(signum, frame) -> None:
    raise _Terminated


def _require_serve_extras() -> None:
    for module in ("fastapi", "uvicorn", "httptools", "jinja2"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"serving needs the serve extras ({module} is not installed): "
                              f"pip install 'familial[serve]'") from None


def _listen(host: str, port: int) -> tuple[socket.socket, bool]:
    """A socket bound to host:port, and whether that address is a loopback one."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: expected a port number in 1..65535")
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as error:
        raise ConfigError(f"--host {host}: not an address of this machine ({error})") from None
    # IPv4 first where a name has both ('localhost'), as uvicorn binds.
    family, _, _, _, address = min(found, key=lambda info: info[0] != socket.AF_INET)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error})") from None
    sock.set_inheritable(True)
    return sock, ipaddress.ip_address(address[0]).is_loopback


def _chat_template(family: Path, option: str | None):
    from familial.chat_template import CHATML, ChatTemplate

    if option is None:
        return ChatTemplate.from_directory(family, fallback=None)
    tokens = ChatTemplate.from_directory(family).tokens
    if option == "chatml":
        return ChatTemplate(CHATML, special_tokens=tokens)
    path = Path(option)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"--chat-template {path}: cannot read it ({error})") from None
    return ChatTemplate(source, where=str(path), special_tokens=tokens)
