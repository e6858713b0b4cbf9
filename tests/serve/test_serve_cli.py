"""`familial serve FAMILY`: the command starts a server that answers, and refuses bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from familial.cli import main


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_without_a_tokenizer_is_refused(family_dir, tmp_path, capsys):
    bare = tmp_path / "bare"
    shutil.copytree(family_dir, bare)
    (bare / "tokenizer.json").unlink()
    assert main(["serve", str(bare)]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err


def test_serve_command_answers_and_stops_on_interrupt(family_dir, http):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "familial.cli", "serve", str(family_dir), "--port", str(port),
               "--max-batch-size", "2", "--max-queue", "4", "--max-seq-len", "128"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        status, health = http.server_up(url, process)
        assert status == 200 and health["max_batch_size"] == 2 and health["max_queue"] == 4
        status, reply = http.post(url, "/v1/chat/completions", {
            "model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert status == 200, json.dumps(reply)
        assert reply["model"] == "exit-1" and reply["usage"]["completion_tokens"] == 3
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert f"http://127.0.0.1:{port}/" in output


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert "serving" not in captured.out and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_serve_without_the_serve_extras_names_the_install(family_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what an install without [serve] looks like
    assert main(["serve", str(family_dir), "--port", str(free_port())]) == 2
    assert "pip install 'familial[serve]'" in one_line_error(capsys)


def test_bad_listen_addresses_fail_in_one_line_before_starting(family_dir, capsys):
    assert main(["serve", str(family_dir), "--host", "999.1.1.1"]) == 2
    assert "--host 999.1.1.1" in one_line_error(capsys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(family_dir), "--port", str(port)]) == 2
        assert f"--port {port}: cannot listen there" in one_line_error(capsys)
    assert main(["serve", str(family_dir), "--port", str(free_port()), "--chat-template", "/nonexistent.jinja"]) == 2
    assert "--chat-template /nonexistent.jinja" in one_line_error(capsys)


BAD_OPTIONS = [
    (["--max-seq-len", "100000000"], "--max-seq-len 100000000: expected 2..4096 tokens (the family's "
                                     "max_position_embeddings in "),
    (["--max-seq-len", "-5"], "--max-seq-len -5: expected 2..4096"),
    (["--max-seq-len", "8192"], "--max-seq-len 8192: expected 2..4096"),
    (["--threads", "-1"], "--threads -1: expected a whole number >= 1"),
    (["--max-batch-size", "0"], "--max-batch-size 0: expected a whole number >= 1"),
    (["--device", "tpu"], "--device tpu: not a torch device; expected cpu, cuda, cuda:N or mps"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--header-timeout", "inf"], "--header-timeout inf: expected a finite number of seconds > 0"),
    (["--body-timeout", "nan"], "--body-timeout nan: expected a finite number of seconds > 0"),
    (["--api-key", "cl\u00e9"], "--api-key: '\u00e9' is not a printable ASCII character"),
]


@pytest.mark.parametrize("options, expected", BAD_OPTIONS, ids=[" ".join(o) for o, _ in BAD_OPTIONS])
def test_bad_options_fail_in_one_line_before_starting(family_dir, capsys, options, expected):
    """Each of these started a server that failed later: a traceback in the engine process, or
    the kernel's OOM killer at the first request (--max-seq-len 100000000: 23.5 GB)."""
    assert main(["serve", str(family_dir), "--port", str(free_port()), *options]) == 2
    assert expected in one_line_error(capsys)


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(child) for child in (task / "children").read_text().split()}
    return found


def running(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False


def test_sigterm_ends_the_server_while_requests_and_a_hanging_template_run(family_dir, tmp_path, http):
    family = tmp_path / "family"
    shutil.copytree(family_dir, family)
    # A checkpoint whose template loops 10^10 times on this conversation.
    (family / "chat_template.jinja").write_text(
        "{% if messages[-1]['content'] == 'spin' %}{% for a in range(100000) %}{% for b in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}{{ messages[-1]['content'] }}")
    port = free_port()
    command = [sys.executable, "-m", "familial.cli", "serve", str(family), "--port", str(port),
               "--max-batch-size", "2", "--max-seq-len", "128"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        http.server_up(url, process)
        workers = children(process.pid)
        assert len(workers) == 4  # the engine process, two chat-template workers, a body worker
        spin = threading.Thread(target=lambda: _try(lambda: http.post(url, "/v1/chat/completions", {
            "model": "exit-1", "max_tokens": 2, "messages": [{"role": "user", "content": "spin"}]})))
        spin.start()
        connection, stream = http.open_stream(url, "/v1/completions",
                                              {"model": "exit-3", "prompt": "Once", "max_tokens": 120})
        assert stream.readline().startswith(b"data: {")
        assert http.get(url, "/health")[0] == 200
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        connection.close()
        spin.join()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output
    assert not any(running(pid) for pid in workers)


def _try(call) -> None:
    try:
        call()
    except OSError:
        pass  # the server went away mid-request: what this test does to it
