"""`familial grpo` under torchrun: 2 gloo processes train exactly as one on the same prompts and seeds."""

import json

import pytest
import torch
from launch import familial
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from familial.checkpoint_io import load_family, save_family
from familial.config import FamilyConfig
from familial.model import FamilyModel

pytestmark = pytest.mark.distributed

CHARS = ["<eos>", *"0123456789+="]
TIMINGS = {"rollout_s", "update_s", "elapsed_s"}


def write_family(path) -> None:
    torch.manual_seed(0)
    model = FamilyModel(FamilyConfig(vocab_size=len(CHARS), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                     exits=[1, 2], max_position_embeddings=64, eos_token_id=0))
    save_family(model, path)
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(path / "tokenizer.json"))


def test_two_processes_train_as_one(tmp_path):
    write_family(tmp_path / "family")
    runs = {}
    for nproc in (1, 2):
        config = tmp_path / f"grpo{nproc}.toml"
        config.write_text(
            f'family = "{tmp_path / "family"}"\noutput = "{tmp_path / f"run{nproc}"}"\nmember = 1\n'
            'steps = 3\nprompts_per_step = 4\ngroup_size = 4\nmax_new_tokens = 3\nlearning_rate = 3e-3\n'
            'updates_per_batch = 2\neval_every = 2\nseed = 5\n[task]\nkind = "sums"\nmax_operand = 4\n')
        output = familial(["grpo", str(config)], nproc=nproc)
        assert f"on {nproc} x cpu" in output
        runs[nproc] = tmp_path / f"run{nproc}"
    one, two = ([json.loads(line) for line in (runs[n] / "grpo.jsonl").read_text().splitlines()] for n in (1, 2))
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert set(a) == set(b)
        for key in set(a) - TIMINGS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert any(r["grad_norm"] > 0 for r in one)
    single, parallel = (load_family(runs[n] / "family") for n in (1, 2))
    for (name, p), q in zip(single.named_parameters(), parallel.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
    start = load_family(tmp_path / "family")
    assert not torch.equal(start.branches["1"].lm_head.weight, single.branches["1"].lm_head.weight)
