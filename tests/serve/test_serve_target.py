"""A request's `target` decodes at the family's calibrated operating point for that agreement."""

from __future__ import annotations

import shutil

from familial.infer.calibrate import write_early_exit
from familial.infer.engine import Engine

PROMPT = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}


def test_a_target_request_answers_from_the_point_it_picks(family_dir, serve, http, tmp_path):
    directory = shutil.copytree(family_dir, tmp_path / "family")
    # Calibrated points, conservative first: exit 1 off; every token leaving at exit 1 (a
    # top-1 probability is never below 0).
    write_early_exit(directory, {"metric": "top1", "thresholds": {"1": 1.0}, "points": [
        {"lower_bound": 0.99, "thresholds": {"1": 1.0}}, {"lower_bound": 0.7, "thresholds": {"1": 0.0}}]})
    engine = Engine.from_checkpoint(directory, max_batch_size=2, max_queue=4, max_seq_len=256)
    with serve(engine) as live:
        members = {}
        for member in ("small", "exit-3"):
            status, reply = http.post(live.url, "/v1/completions", {**PROMPT, "model": member})
            assert status == 200, reply
            members[member] = reply["choices"][0]["text"]
        assert members["small"] != members["exit-3"]
        for target, member, exit_layer in ((0.95, "exit-3", 3), (0.7, "small", 1), (0.5, "small", 1)):
            status, reply = http.post(live.url, "/v1/completions", {**PROMPT, "model": "auto", "target": target})
            assert status == 200, reply
            assert reply["choices"][0]["text"] == members[member], target
            assert reply["familial"]["exits"] == [exit_layer] * 8, target
            assert reply["usage"]["completion_tokens"] == 8
