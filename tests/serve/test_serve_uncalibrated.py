"""`auto` on a family `familial calibrate` has not seen says so: in the response and in generate."""

from __future__ import annotations

import json

from familial.cli import main

PROMPT = "Once upon a time"


def test_auto_on_an_uncalibrated_family_says_so_in_the_familial_field(client):
    response = client.completions.create(model="auto", prompt=PROMPT, max_tokens=3, temperature=0)
    note = response.familial["note"]
    assert "not calibrated" in note and "full member" in note and "familial calibrate" in note
    member = client.completions.create(model="exit-1", prompt=PROMPT, max_tokens=3, temperature=0)
    assert "note" not in member.familial
    budget = client.completions.create(model="auto", prompt=PROMPT, max_tokens=3, temperature=0,
                                       extra_body={"budget": 0.9})
    assert "note" not in budget.familial
    chunks = [json.loads(chunk.model_dump_json()) for chunk in client.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0, stream=True)]
    notes = [chunk["familial"].get("note") for chunk in chunks]
    assert notes[0] == note and not any(notes[1:])


def test_generate_auto_on_an_uncalibrated_family_says_so(family_dir, capsys):
    assert main(["generate", str(family_dir), "--prompt-ids", "5,6,7", "--member", "auto",
                 "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert "[note: this family is not calibrated" in capsys.readouterr().err
    assert main(["generate", str(family_dir), "--prompt-ids", "5,6,7", "--member", "exit-1",
                 "--max-new-tokens", "2", "--threads", "1"]) == 0
    assert "note" not in capsys.readouterr().err
