"""`familial export --format gguf`: members as llama.cpp files, read back by our import and by
transformers' GGUF loader (llama.cpp itself: test_llamacpp_parity.py)."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from gguf_files import TEXT, hf_model, train_tokenizer, write_gguf
from familial.checkpoint_io import import_checkpoint, load_family, save_family
from familial.cli import main
from familial.config import ConfigError
from familial.gguf.write import export_member_gguf, llama3_rope_factors
from familial.model import rotary_inverse_frequencies
from familial.staging import OutputPathError

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(320)


def make_family(tmp_path, tokenizer, arch: str, tied: bool):
    """A family of exits [0, 1, 2] imported from a GGUF file (so it has a tokenizer and template)."""
    source = write_gguf(tmp_path / "source.gguf", hf_model(arch, tie_word_embeddings=tied), arch, {},
                        tokenizer, chat_template=TEMPLATE)
    import_checkpoint(source, tmp_path / "family", exits=[0, 1, 2], member_names={"small": 0})
    return tmp_path / "family"


@pytest.mark.reference
@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen3", False)])
def test_every_member_exports_as_a_gguf_file_that_reads_back_as_itself(tmp_path, tokenizer, arch, tied):
    family_dir = make_family(tmp_path, tokenizer, arch, tied)
    family = load_family(family_dir).eval()
    assert main(["export", str(family_dir), str(tmp_path / "members"), "--all", "--format", "gguf"]) == 0
    assert sorted(p.name for p in (tmp_path / "members").iterdir()) == ["exit-1.gguf", "exit-2.gguf", "small.gguf"]
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        outputs = family(ids)
    for name, exit_layer in (("small", 0), ("exit-1", 1), ("exit-2", 2)):
        path = tmp_path / "members" / f"{name}.gguf"
        stock = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        assert stock.config.num_hidden_layers == family.config.member_layers(exit_layer)
        with torch.no_grad():
            torch.testing.assert_close(stock(ids).logits, outputs[exit_layer], rtol=0, atol=1e-5)
    import_checkpoint(tmp_path / "members" / "small.gguf", tmp_path / "back", exits=[0])
    back = load_family(tmp_path / "back").eval()
    assert back.config.architecture == arch
    with torch.no_grad():
        torch.testing.assert_close(back(ids)[0], outputs[0], rtol=0, atol=1e-6)
    ours, theirs = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (family_dir, tmp_path / "back"))
    assert ours.encode(TEXT).ids == theirs.encode(TEXT).ids
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE


@pytest.mark.reference
def test_q8_0_and_half_types_stay_close_to_the_member(tmp_path, tokenizer):
    """Quantised exports lose precision, not structure: logits within a small error, and
    the next-token choice of the f32 member on nearly every position."""
    family_dir = make_family(tmp_path, tokenizer, "llama", True)
    family = load_family(family_dir).eval()
    ids = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        reference = family(ids)[2]
    for kind, bound in (("f16", 2e-3), ("bf16", 2e-2), ("q8_0", 2e-2)):
        path = export_member_gguf(family_dir, tmp_path / f"{kind}.gguf", 2, kind)
        stock = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = stock(ids).logits
        assert (logits - reference).abs().max() < bound * reference.abs().max(), kind
        assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95, kind
    sizes = {kind: (tmp_path / f"{kind}.gguf").stat().st_size for kind in ("f16", "q8_0")}
    assert sizes["q8_0"] < 0.7 * sizes["f16"]


def test_llama3_rope_becomes_llama_cpp_frequency_factors():
    from familial import FamilyConfig

    config = FamilyConfig(vocab_size=50, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, exits=[1], qk_norm=False,
                          rope_theta=100000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    plain = 1.0 / (config.rope_theta ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    factors = llama3_rope_factors(config)
    assert factors.min() == 1.0 and factors.max() == 8.0 and ((factors > 1) & (factors < 8)).any()
    scaled, _ = rotary_inverse_frequencies(config)
    torch.testing.assert_close(plain / factors, scaled, rtol=1e-6, atol=0)


def test_gguf_export_refuses_what_llama_cpp_cannot_load_and_writes_nothing_on_failure(
        tmp_path, tokenizer, monkeypatch, capsys):
    family_dir = make_family(tmp_path, tokenizer, "llama", True)
    family = load_family(family_dir)
    save_family(family, tmp_path / "bare")  # no tokenizer files
    with pytest.raises(ConfigError, match="no tokenizer.json; a GGUF file carries its tokenizer"):
        export_member_gguf(tmp_path / "bare", tmp_path / "a.gguf", 2)
    family.config.rope_scaling = {"rope_type": "yarn", "factor": 4.0}
    save_family(family, tmp_path / "yarn", tokenizer_source=family_dir)
    with pytest.raises(ConfigError, match="'rope_scaling'.*GGUF export supports plain, linear"):
        export_member_gguf(tmp_path / "yarn", tmp_path / "a.gguf", 2)
    assert main(["export", str(family_dir), str(tmp_path / "h"), "--member", "2", "--type", "q8_0"]) == 2
    assert "--type chooses a GGUF weight type" in capsys.readouterr().err

    export_member_gguf(family_dir, tmp_path / "m.gguf", 2)
    before = (tmp_path / "m.gguf").read_bytes()
    with pytest.raises(OutputPathError, match="already exists"):
        export_member_gguf(family_dir, tmp_path / "m.gguf", 2)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("familial.gguf.write._encode", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_member_gguf(family_dir, tmp_path / "m.gguf", 0, overwrite=True)
    assert (tmp_path / "m.gguf").read_bytes() == before
    assert main(["export", str(family_dir), str(tmp_path / "all"), "--all", "--format", "gguf"]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "family", "m.gguf", "source.gguf", "yarn"]
