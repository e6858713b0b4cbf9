"""Random families in the shapes users serve, for the benches against vLLM (serve.py, vs_vllm.py).

Speed depends on the shape, not on what the weights learned, so a random family of a user's
shape times as that user's model would. `--hidden 256 512 1024` runs each width (8 layers,
head dim 64, half as many KV heads as query heads, FFN 3x hidden); `--smollm2` adds
SmolLM2-135M's shape (hidden 576, 30 layers, 9/3 heads, FFN 1536, vocabulary 49152). The
output heads are scaled up so greedy choices are not near-ties, and a vocabulary larger than
the bundled tokenizer's 2048 gets that tokenizer with the missing ids added as plain tokens,
so every id decodes to text on both servers.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from familial.checkpoint_io import save_family
from familial.config import FamilyConfig
from familial.model import FamilyModel

ASSETS = Path(str(resources.files("familial.data").joinpath("assets")))


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int

    @property
    def label(self) -> str:
        return f"hidden {self.hidden}, {self.layers} layers, {self.heads}/{self.kv_heads} heads, ffn {self.ffn}, " \
               f"vocab {self.vocab}"


SMOLLM2 = Shape(hidden=576, layers=30, heads=9, kv_heads=3, ffn=1536, vocab=49152)


def add_arguments(parser: argparse.ArgumentParser, hidden: list[int]) -> None:
    parser.add_argument("--family", help="family checkpoint directory (instead of random shapes)")
    parser.add_argument("--hidden", type=int, nargs="+", default=hidden, help=f"widths to run (default {hidden})")
    parser.add_argument("--layers", type=int, default=8, help="layers of each random width (default 8)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary of each random width (default 2048)")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M's shape (random weights)")


def shapes(args: argparse.Namespace) -> list[Shape]:
    chosen = [Shape(h, args.layers, h // 64, max(1, h // 128), 3 * h, args.vocab) for h in args.hidden]
    return chosen + [SMOLLM2] if args.smollm2 else chosen


def exits(layers: int) -> list[int]:
    """Four exits spread over the depth, the last one the full member (8 layers: 1, 3, 5, 7)."""
    return sorted({max(0, layers * k // 4 - 1) for k in (1, 2, 3, 4)})


def random_family(directory: Path, shape: Shape) -> Path:
    torch.manual_seed(0)
    config = FamilyConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                          num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                          num_key_value_heads=shape.kv_heads, head_dim=64, exits=exits(shape.layers),
                          max_position_embeddings=1024)
    model = FamilyModel(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lm_head.weight"):
                parameter.mul_(30)
    return save_family(model, directory, tokenizer_source=tokenizer(directory.parent / "tokenizer", shape.vocab))


def tokenizer(directory: Path, vocab: int) -> Path:
    """The bundled tokenizer, grown to `vocab` ids with plain tokens where it has fewer."""
    from tokenizers import Tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ASSETS / "tokenizer_config.json", directory / "tokenizer_config.json")
    bundled = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    size = bundled.get_vocab_size(with_added_tokens=True)
    if vocab > size:
        bundled.add_tokens([f"<t{i}>" for i in range(size, vocab)])
    bundled.save(str(directory / "tokenizer.json"))
    return directory


def describe(family: Path) -> str:
    config = json.loads((family / "family.json").read_text())
    return (f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
            f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, "
            f"vocab {config['vocab_size']}")
