"""`familial serve FAMILY`: the command starts a server that answers, and refuses bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

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
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                status, health = http.get(url, "/health")
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
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
