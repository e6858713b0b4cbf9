"""Evaluating a family: per-member quality (loss, perplexity, tasks), cost and agreement.

`perplexity` scores every member in one trunk pass over held-out token shards; `tasks` runs
multiple-choice and generation tasks from local JSONL; `cost` counts parameters and FLOPs and
times prefill/decode; `agreement` compares each member's top-1 token with the full member's;
`report` turns an eval JSON into a Markdown report with charts; `lm_eval_adapter` plugs a
member into lm-evaluation-harness.
"""
