"""Multiple choice by log-likelihood and generation by exact match, per member."""

from __future__ import annotations

import json

import pytest
import torch

from familial.checkpoint_io import load_family
from familial.eval.tasks import (TaskError, encode, encode_pair, evaluate_task, greedy_texts,
                                 load_tokenizer, read_task, score_continuations)
from familial.infer.engine import Engine


@pytest.fixture(scope="module")
def loaded(alphabet_family):
    return load_family(alphabet_family).eval(), load_tokenizer(alphabet_family)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_multiple_choice_picks_the_next_letter_for_every_member(loaded, tmp_path):
    model, tokenizer = loaded
    items = [{"context": "k l m", "choices": [" n", " q", " b"], "answer": 0},
             {"context": "c d e f", "choices": [" z", " a", " g h"], "answer": 2},
             # A trailing space in the context moves to the choice, as in lm-eval.
             {"context": "r s ", "choices": ["x", "t", "f"], "answer": 1}]
    task = read_task(write_jsonl(tmp_path / "next_letter.jsonl", items))
    assert task.kind == "multiple_choice" and task.name == "next_letter"
    scores = evaluate_task(model, tokenizer, task, [1, 3])
    for e in (1, 3):
        assert scores[e] == {"acc": 1.0, "acc_norm": 1.0, "acc_bytes": 1.0, "n": 3}


def test_a_wrong_answer_key_scores_zero(loaded, tmp_path):
    model, tokenizer = loaded
    task = read_task(write_jsonl(tmp_path / "wrong.jsonl",
                                 [{"context": "k l m", "choices": [" n", " q"], "answer": 1}]))
    assert evaluate_task(model, tokenizer, task, [3])[3]["acc"] == 0.0


def test_continuation_scores_equal_each_members_own_log_probabilities(loaded):
    model, tokenizer = loaded
    texts = [("a b c", " d e"), ("p q r s t u", " v"), ("x", " y z"), ("g h i j", " k")]
    pairs = [encode_pair(tokenizer, c, x, 0) for c, x in texts]
    scores = score_continuations(model, [1, 3], pairs, batch_size=3)
    for e in (1, 3):
        member = model.member(e)
        for (context, continuation), (logprob, greedy) in zip(pairs, scores[e]):
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                log_probs = torch.log_softmax(member(ids)[0, :-1].float(), -1)
            steps = range(len(context) - 1, ids.shape[1] - 1)
            expected = sum(log_probs[t, ids[0, t + 1]].item() for t in steps)
            assert logprob == pytest.approx(expected, abs=1e-4)
            assert greedy == all(log_probs[t].argmax() == ids[0, t + 1] for t in steps)
    # A context longer than the window is cut on the left: 4 positions hold the last 4 context
    # tokens, whose outputs predict the one continuation token.
    context, continuation = pairs[1][0] * 3, pairs[1][1]
    cut = score_continuations(model, [3], [(context, continuation)], max_length=4)[3][0]
    kept = score_continuations(model, [3], [(context[-4:], continuation)])[3][0]
    assert cut[0] == pytest.approx(kept[0], abs=1e-5)


def test_greedy_generation_equals_recomputing_every_step_with_the_member(loaded):
    model, tokenizer = loaded
    engine = Engine(model, tokenizer, max_batch_size=2)
    prompts = [encode(tokenizer, "e f g"), encode(tokenizer, "s")]
    for e in (1, 3):
        expected = []
        for prompt in prompts:
            ids = list(prompt)
            with torch.no_grad():
                for _ in range(6):
                    ids.append(int(model.member(e)(torch.tensor([ids]))[0, -1].argmax()))
            expected.append(tokenizer.decode(ids[len(prompt):]))
        assert greedy_texts(engine, e, [(p, 6, []) for p in prompts]) == expected
    assert greedy_texts(engine, 3, [(prompts[0], 3, []), (prompts[0], 9, [" k"])]) == [" h i j"] * 2


def test_generation_exact_match_with_stop_strings(loaded, tmp_path):
    model, tokenizer = loaded
    items = [{"prompt": "c d e f", "answer": "g h i", "max_new_tokens": 3},
             {"prompt": "c d e f", "answer": ["x y z", "q"], "max_new_tokens": 3},
             {"prompt": "p q r", "answer": "s t", "stop": [" u"], "max_new_tokens": 10}]
    task = read_task(write_jsonl(tmp_path / "continue.jsonl", items))
    assert task.kind == "generation"
    scores = evaluate_task(model, tokenizer, task, [1, 3])
    for e in (1, 3):
        assert scores[e] == {"exact_match": pytest.approx(2 / 3), "n": 3}


@pytest.mark.parametrize("record, message", [
    ({"context": "a", "choices": [" b", " c"], "answer": 2}, "field 'answer' = 2"),
    ({"context": "a", "choices": [" b"], "answer": 0}, "field 'choices'"),
    ({"prompt": "a"}, "field 'answer' is missing"),
    ({"question": "a"}, "expected 'context'/'choices'/'answer'"),
])
def test_malformed_task_lines_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "x"}] if "prompt" in record
                       else [{"context": "ok", "choices": [" a", " b"], "answer": 0}])
    path.write_text(path.read_text() + json.dumps(record) + "\n")
    with pytest.raises(TaskError, match=f"bad.jsonl:2: .*{message}"):
        read_task(path)


def test_mixed_task_kinds_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": "a", "answer": "b"},
                                                  {"context": "a", "choices": [" b", " c"], "answer": 0}])
    with pytest.raises(TaskError, match="mixed.jsonl:2: mixes"):
        read_task(path)
