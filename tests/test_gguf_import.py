"""`familial import MODEL.gguf`: llama and qwen3 GGUF files, quantised or not, against
transformers' own GGUF loader and the stock model they came from."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from gguf_files import TEXT, hf_model, train_tokenizer, write_gguf
from familial.checkpoint_io import import_checkpoint, load_family
from familial.cli import main
from familial.config import ConfigError

# Every tensor kind in another type: the three K-quants, the legacy quants and the floats.
MIXED = {"token_embd": "Q8_0", "attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K",
         "attn_output": "Q4_0", "ffn_gate": "Q4_1", "ffn_up": "F16", "ffn_down": "BF16", "output": "Q8_0"}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(320)


@pytest.mark.reference
@pytest.mark.parametrize("arch, tied", [("llama", True), ("qwen3", False)])
def test_quantised_gguf_imports_as_transformers_loads_it(tmp_path, tokenizer, arch, tied):
    path = write_gguf(tmp_path / "model.gguf", hf_model(arch, tie_word_embeddings=tied), arch, MIXED,
                      tokenizer, chat_template=TEMPLATE)
    assert main(["import", str(path), str(tmp_path / "family"), "--exits", "1,2"]) == 0
    family = load_family(tmp_path / "family").eval()
    assert family.config.architecture == arch and family.config.tie_word_embeddings is tied
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(family(ids)[2], stock(ids).logits, rtol=0, atol=1e-4)

    ours = Tokenizer.from_file(str(tmp_path / "family" / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert ours.encode(TEXT).ids == theirs(TEXT)["input_ids"] == tokenizer.encode(TEXT).ids
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert ours.encode(chat).ids[0] == ours.token_to_id("<|im_start|>")
    assert ours.decode(ours.encode(TEXT).ids) == TEXT
    config = json.loads((tmp_path / "family" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TEMPLATE
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.reference
def test_f32_llama_gguf_imports_as_the_model_it_was_converted_from(tmp_path):
    """Undoing llama.cpp's Q/K permutation checked against the stock model itself."""
    model = hf_model("llama", attention_bias=True)
    path = write_gguf(tmp_path / "model.gguf", model, "llama", {})
    import_checkpoint(path, tmp_path / "family", exits=[0, 2], shared_head=True)
    family = load_family(tmp_path / "family").eval()
    assert not (tmp_path / "family" / "tokenizer.json").exists()  # the file had no tokenizer
    ids = torch.randint(0, 320, (1, 33))
    with torch.no_grad():
        torch.testing.assert_close(family(ids)[2], model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("original", [8192, 32])
def test_llama3_rope_factors_import_as_llama3_scaling(tmp_path, original):
    """llama.cpp stores Llama 3.1's scaling as per-frequency factors (`rope_freqs.weight`):
    Llama 3.1's own constants (original context 8192), or others fitted to the factors; the
    family equals the stock model, and exports the same factors again."""
    rope = {"rope_type": "llama3", "rope_theta": 100000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": original}
    model = hf_model("llama", rope_parameters=rope)
    path = write_gguf(tmp_path / "model.gguf", model, "llama", {})
    import_checkpoint(path, tmp_path / "family", exits=[2])
    family = load_family(tmp_path / "family").eval()
    assert family.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 320, (1, 48))
    with torch.no_grad():
        torch.testing.assert_close(family(ids)[2], model(ids).logits, rtol=0, atol=1e-5)


def test_smollm_pre_tokenizer_splits_digits_one_by_one(tmp_path, tokenizer):
    path = write_gguf(tmp_path / "model.gguf", hf_model("llama"), "llama", {}, tokenizer, pre="smollm")
    import_checkpoint(path, tmp_path / "family", exits=[2])
    ours = Tokenizer.from_file(str(tmp_path / "family" / "tokenizer.json"))
    assert [ours.decode([i]) for i in ours.encode("x 2024").ids][-4:] == ["2", "0", "2", "4"]


def test_bad_gguf_files_are_named(tmp_path, tokenizer):
    path = write_gguf(tmp_path / "model.gguf", hf_model("llama"), "llama", {}, tokenizer, pre="kitchen-sink")
    with pytest.raises(ConfigError, match="'tokenizer.ggml.pre' = 'kitchen-sink': supported pre-tokenizers"):
        import_checkpoint(path, tmp_path / "a", exits=[2])
    with pytest.raises(ConfigError, match="needs exits"):
        import_checkpoint(path, tmp_path / "a", exits=None)
    other = write_gguf(tmp_path / "phi.gguf", hf_model("llama"), "phi3", {})
    with pytest.raises(ConfigError, match="'general.architecture' = 'phi3': expected one of llama, qwen3"):
        import_checkpoint(other, tmp_path / "a", exits=[2])
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ConfigError, match="truncated.gguf: not a readable GGUF file"):
        import_checkpoint(truncated, tmp_path / "a", exits=[2])
    assert not (tmp_path / "a").exists()
