"""Where weights come from: float32 master weights from any checkpoint, layout-independent random
init, region reads straight from safetensors files."""

from __future__ import annotations

import pytest
import torch
from hf_checkpoints import write_tiny_hf
from safetensors.torch import save_file

from familial.checkpoint_io import SafetensorsReader
from familial.config import FamilyConfig
from familial.train.config import load_config
from familial.train.init import RandomInit
from familial.train.loop import Trainer


def test_a_bf16_hf_checkpoint_trains_float32_master_weights(tmp_path, shards, make_config):
    hf = write_tiny_hf(tmp_path / "hf", dtype=torch.bfloat16, vocab_size=61)
    data = make_config(tmp_path, shards, steps=1, lr={"lr": 1e-5, "min_lr": 0.0, "kind": "constant"},
                       optim={"weight_decay": 0.0}, loss={"chunk_size": 13})
    data["init"] = {"hf": str(hf), "exits": [1, 3, 5]}
    trainer = Trainer(load_config(data=data))
    # Read in place: nothing was imported into the run directory.
    assert not (tmp_path / "run").exists()
    parameters = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert {p.dtype for p in parameters} == {torch.float32}
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    # bf16 values upcast exactly.
    assert all(torch.equal(v, v.bfloat16().float()) for v in before.values())
    trainer.run()
    moved = vanished_in_bf16 = 0
    for name, p in trainer.model.named_parameters():
        changed = p.detach() != before[name]
        moved += int(changed.sum())
        # AdamW moves each weight by ~lr = 1e-5, below bf16's resolution (2^-8 relative) at
        # these magnitudes: in bf16 these updates would round away.
        vanished_in_bf16 += int((changed & (p.detach().bfloat16() == before[name].bfloat16())).sum())
    assert moved > 0 and vanished_in_bf16 > moved // 2


def test_random_init_does_not_depend_on_how_a_parameter_is_cut():
    config = FamilyConfig(vocab_size=300, hidden_size=8192, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=64, num_key_value_heads=64, exits=[0, 1])
    source = RandomInit(config, seed=3)
    name = "model.embed_tokens.weight"  # 300 rows of 8192: 128 rows per seeded block
    whole = torch.empty(300, 8192)
    source.read(name, (slice(0, 300), slice(0, 8192)), whole)
    for rows, columns in [(slice(100, 260), slice(0, 8192)), (slice(0, 300), slice(4096, 8192)),
                          (slice(127, 129), slice(10, 20))]:
        part = torch.empty(rows.stop - rows.start, columns.stop - columns.start)
        source.read(name, (rows, columns), part)
        assert torch.equal(part, whole[rows, columns])
    assert whole.std().item() == pytest.approx(config.initializer_range, rel=0.01)
    again = torch.empty(300, 8192)
    RandomInit(config, seed=4).read(name, (slice(0, 300), slice(0, 8192)), again)
    assert not torch.equal(again, whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_region_reads_return_exactly_the_stored_slice(tmp_path, dtype, monkeypatch):
    import familial.checkpoint_io as io

    monkeypatch.setattr(io, "READ_BLOCK_BYTES", 64)  # several blocks per region
    tensors = {"a": torch.randn(37, 11).to(dtype), "b": torch.randn(5).to(dtype)}
    (tmp_path / "model.safetensors").parent.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with SafetensorsReader(tmp_path) as reader:
        out = torch.empty(20, 4)
        reader.read_region("a", (slice(9, 29), slice(3, 7)), out)
        assert torch.equal(out, tensors["a"][9:29, 3:7].float())
        vector = torch.empty(3)
        reader.read_region("b", (slice(1, 4),), vector)
        assert torch.equal(vector, tensors["b"][1:4].float())
