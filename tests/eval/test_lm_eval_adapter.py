"""The lm-evaluation-harness model `familial` scores requests exactly as our own scorer does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lm_eval
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from familial.checkpoint_io import load_family
from familial.eval.lm_eval_adapter import FamilialLM
from familial.eval.tasks import (encode, encode_pair, evaluate_task, load_tokenizer, prefix_token_id, read_task,
                                 score_continuations)

pytestmark = pytest.mark.reference

ITEMS = [{"context": "k l m", "choices": [" n", " q", " b"], "answer": 0},
         {"context": "c d e f", "choices": [" z", " a", " g h"], "answer": 2},
         {"context": "r s ", "choices": ["x", "t", "f"], "answer": 1}]


@pytest.fixture(scope="module")
def ours(alphabet_family):
    return load_family(alphabet_family).eval(), load_tokenizer(alphabet_family)


@pytest.fixture
def local_task(tmp_path):
    """A harness task over a local JSONL file: nothing is downloaded."""
    data = tmp_path / "alphabet.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "alphabet_mc.yaml").write_text(f"""\
task: alphabet_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "datasets"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    return data, tmp_path / "tasks"


def our_scores(model, tokenizer, pairs, exits):
    encoded = [encode_pair(tokenizer, c, x, prefix_token_id(model.config)) for c, x in pairs]
    return score_continuations(model, exits, encoded)


def test_adapter_loglikelihoods_equal_our_scorer_for_each_member(alphabet_family, ours):
    model, tokenizer = ours
    pairs = [("k l m", " n"), ("k l m", " q"), ("r s ", "t"), ("", "a b c"), ("x y", " z a b")]
    expected = our_scores(model, tokenizer, pairs, [1, 3])
    for member, e in (("small", 1), ("3", 3)):
        adapter = FamilialLM(path=str(alphabet_family), member=member, batch_size=2)
        requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
        got = adapter.loglikelihood(requests, disable_tqdm=True)
        assert [g for _, g in got] == [g for _, g in expected[e]]
        assert [s for s, _ in got] == pytest.approx([s for s, _ in expected[e]], abs=1e-5)


def test_rolling_loglikelihood_is_the_sum_over_every_token(alphabet_family, ours):
    model, tokenizer = ours
    text = "d e f g h"
    adapter = FamilialLM(path=str(alphabet_family), member="full")
    (total,) = adapter.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    ids = [prefix_token_id(model.config)] + encode(tokenizer, text)
    with torch.no_grad():
        log_probs = torch.log_softmax(model.member(3)(torch.tensor([ids]))[0], -1)
    assert total == pytest.approx(sum(log_probs[t, ids[t + 1]].item() for t in range(len(ids) - 1)),
                                  abs=1e-4)


def test_generate_until_stops_at_the_stop_string(alphabet_family):
    adapter = FamilialLM(path=str(alphabet_family), member="small")
    request = Instance("generate_until", {}, ("c d e f", {"until": [" j"], "max_gen_toks": 10}), 0)
    assert adapter.generate_until([request], disable_tqdm=True) == [" g h i"]
    sampled = Instance("generate_until", {}, ("c d", {"do_sample": True}), 0)
    with pytest.raises(ValueError, match="decodes greedily"):
        adapter.generate_until([sampled], disable_tqdm=True)


def test_simple_evaluate_on_a_local_task_matches_our_task_scores(alphabet_family, ours, local_task):
    model, tokenizer = ours
    data, include = local_task
    results = lm_eval.simple_evaluate(
        model="familial", model_args=f"path={alphabet_family},member=small", tasks=["alphabet_mc"],
        task_manager=TaskManager(include_path=str(include), include_defaults=False),
        log_samples=True)
    mine = evaluate_task(model, tokenizer, read_task(data), [1])[1]
    assert results["results"]["alphabet_mc"]["acc,none"] == mine["acc"] == 1.0
    assert results["results"]["alphabet_mc"]["acc_norm,none"] == mine["acc_norm"]
    for sample in results["samples"]["alphabet_mc"]:
        expected = our_scores(model, tokenizer, sample["arguments"], [1])[1]
        assert [r[0] for r in sample["filtered_resps"]] == pytest.approx([s for s, _ in expected], abs=1e-5)


@pytest.mark.slow  # lm_eval's command line indexes all its ~10k built-in task files first
def test_lm_eval_command_line_runs_the_familial_model(alphabet_family, local_task, tmp_path):
    _, include = local_task
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(
        [sys.executable, "-m", "familial.eval.lm_eval_adapter", "--model", "familial",
         "--model_args", f"path={alphabet_family},member=full", "--tasks", "alphabet_mc",
         "--include_path", str(include), "--output_path", str(tmp_path / "out")],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    assert json.loads(result_file.read_text())["results"]["alphabet_mc"]["acc,none"] == 1.0
