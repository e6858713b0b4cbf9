"""lm-evaluation-harness model `familial`: one member of a family checkpoint.

    python -m familial.eval.lm_eval_adapter --model familial \\
        --model_args path=FAMILY,member=E --tasks TASK [--include_path DIR] ...

takes exactly `lm_eval`'s arguments (this module registers the model, then runs lm_eval's
command line). lm-eval 0.4 has no plugin entry points, so a plain `lm_eval` process knows the
model only after `import familial.eval.lm_eval_adapter` (in Python: import it, then call
`lm_eval.simple_evaluate(model="familial", ...)`).

model_args: `path` (family directory with tokenizer.json), `member` (exit index or alias;
default the full member), `batch_size`, `max_length` (default max_position_embeddings),
`max_gen_toks` (default 256), `dtype` (default float32), `device` (default cpu).
Log-likelihoods come from `familial.eval.tasks.score_continuations`, the scorer behind
`familial eval --tasks`, so both report the same numbers; generation is greedy on the
runtime's engine (EOS also ends it).
"""

from __future__ import annotations

import sys

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry

from familial.checkpoint_io import DTYPES, load_family
from familial.eval.tasks import (encode, eos_ids, greedy_texts, load_tokenizer, prefix_token_id,
                                 score_continuations)
from familial.infer.engine import Engine

# Registered by "module:Class" rather than with the decorator: under `python -m` this file
# runs as __main__ and is imported again by name, which would register two classes.
model_registry.register("familial", target="familial.eval.lm_eval_adapter:FamilialLM")


class FamilialLM(TemplateLM):
    def __init__(self, path: str, member: int | str = -1, batch_size: int | str | None = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, dtype: str = "float32",
                 device: str | None = "cpu", **_harness_options) -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"model_args dtype={dtype!r}: expected one of {sorted(DTYPES)}")
        # lm_eval's command line asks for cuda:0 unless told otherwise: on a machine without
        # a GPU that default means the CPU, not an error.
        device = device or "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            device = "cpu"
        self.path = str(path)
        self.family = load_family(path, dtype=DTYPES[dtype], device=device).eval()
        self.config = self.family.config
        self.exit = self.config.resolve_member(member)
        self.tokenizer = load_tokenizer(path)
        # "auto" batch sizing probes GPU memory; a fixed size is as good for these models.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self._max_length = int(max_length or self.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self._device = device
        self.engine: Engine | None = None

    @property
    def eot_token_id(self) -> int:
        eos = eos_ids(self.config)
        return eos[0] if eos else prefix_token_id(self.config)

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.config)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"{self.path}/tokenizer.json"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return encode(self.tokenizer, string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        scores = score_continuations(self.family, [self.exit], pairs, self.batch_size,
                                     self.max_length)[self.exit]
        for (key, _, _), score in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum log-likelihood of whole texts, in disjoint windows of up to max_length tokens."""
        windows, owners = [], []
        for index, request in enumerate(requests):
            (text,) = request.args
            for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        scores = score_continuations(self.family, [self.exit], windows, self.batch_size,
                                     self.max_length)[self.exit]
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, scores):
            totals[owner] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations on the runtime's engine, each ending before its `until` strings."""
        batch = []
        for request in requests:
            context, options = request.args
            options = dict(options or {})
            if options.get("do_sample") or float(options.get("temperature", 0) or 0) > 0:
                raise ValueError(f"task {request.task_name}: the familial adapter decodes greedily; "
                                 f"set do_sample: false / temperature: 0 in generation_kwargs")
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(options.get("max_gen_toks", self.max_gen_toks))
            batch.append((self.tok_encode(context) or [self.prefix_token_id], limit, until))
        if self.engine is None:
            self.engine = Engine(self.family, self.tokenizer, max_batch_size=self.batch_size,
                                 device=self.device, max_seq_len=self.max_length)
        texts = greedy_texts(self.engine, self.exit, batch)
        for request, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return texts


def main(argv: list[str] | None = None) -> None:
    """lm_eval's command line, with the `familial` model registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
