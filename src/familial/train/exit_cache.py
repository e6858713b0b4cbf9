"""The frozen trunk's view of a token stream, computed once and kept on disk for branch training.

With the trunk frozen, what a branch sees and what it is taught are fixed per token: the
hidden state entering its exit layer, and the full member's next-token distribution. So one
forward pass of the trunk over the training tokens writes them here, and every epoch of
branch training reads them back instead of running the trunk again (Balcony, arXiv
2503.05005, trains exits of a frozen model the same way, by self-distillation).

A cache is a directory of `.npy` arrays, opened memory-mapped:

    cache.json            what made it: the trunk's fingerprint, exits, seq_len, top_k, dtypes
    tokens.npy            (rows, seq_len + 1) int32 token windows; targets are tokens[:, 1:]
    hidden-<E>.npy        (rows, seq_len, hidden) state entering exit E's branch (float16 by
                          default: half the disk of float32, and far inside float16's range
                          after the trunk's own norms; float32 for exact checks)
    top_ids.npy           (rows, seq_len, top_k) int32 the full member's most likely tokens
    top_logprobs.npy      (rows, seq_len, top_k) float32 their log-probabilities (over the
                          whole vocabulary, so the tail's mass is 1 - sum(exp))
    teacher_nll.npy       (rows, seq_len) float32 the full member's loss on each target

Rows are windows of `seq_len + 1` tokens at stride `seq_len` (as `StreamRows` cuts them), in
stream order; a cap on the tokens keeps windows spread evenly over the stream. The directory is written atomically; a cache made from another trunk (other
weights or dimensions) is refused by `check_family`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from familial.data.batches import StreamRows
from familial.data.shards import TokenShards
from familial.model import FamilyModel, embed_inputs
from familial.staging import atomic_directory

CACHE_JSON = "cache.json"
CACHE_VERSION = 1
HIDDEN_DTYPES = {"float16": np.float16, "float32": np.float32}
# Bytes of one (tokens, vocab) float32 buffer of a head chunk (`head_chunk_rows`).
HEAD_CHUNK_BYTES = 24 * 1024 * 1024
# Fields of the family config that shape the trunk's computation (exits and branches do not).
TRUNK_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rms_norm_eps",
                "tie_word_embeddings", "attention_bias")


class CacheError(ValueError):
    """A cache that is missing, incomplete, or was made from another trunk."""


def trunk_parameters(model: FamilyModel) -> dict[str, torch.Tensor]:
    """The full member's own tensors: what a cache depends on, and what branch training
    must leave bitwise unchanged."""
    return {name: p for name, p in model.named_parameters(remove_duplicate=False)
            if not name.startswith("branches.")}


def trunk_fingerprint(model: FamilyModel) -> str:
    """sha256 over the trunk-shaping config fields and every trunk tensor's bytes."""
    digest = hashlib.sha256()
    fields = {name: getattr(model.config, name) for name in TRUNK_FIELDS}
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for name, tensor in sorted(trunk_parameters(model).items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class CacheSpec:
    exits: list[int]
    seq_len: int
    top_k: int
    rows: int
    hidden_size: int
    vocab_size: int
    hidden_dtype: str
    fingerprint: str
    data: str = ""
    version: int = CACHE_VERSION


def head_chunk_rows(vocab_size: int) -> int:
    """Tokens per head chunk: bounds the (chunk, vocab) logits held at once, and keeps each
    float32 buffer below glibc's mmap ceiling, so with `allocator.retain_freed_memory` a chunk's
    buffers are reused rather than faulted in anew."""
    return max(16, HEAD_CHUNK_BYTES // (4 * vocab_size))


@torch.no_grad()
def trunk_outputs(model: FamilyModel, input_ids: torch.Tensor, exits: list[int]
                  ) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """({exit: state entering its branch (B, T, H)}, the full member's normed final state
    (B, T, H)), running each trunk layer once and no branch."""
    hidden, rotary, mask = embed_inputs(model.model.embed_tokens, model.model.rotary_emb, input_ids, None, None)
    states = {}
    for i in range(model.config.num_hidden_layers):
        if i in exits:
            states[i] = hidden
        hidden = model.model.layers[str(i)](hidden, rotary, mask)
    return states, model.model.norm(hidden)


@torch.no_grad()
def teacher_top_k(model: FamilyModel, normed: torch.Tensor, targets: torch.Tensor, top_k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full member's top-k log-probabilities and their ids (B, T, k), and its loss on
    `targets` (B, T), from its normed final state, the head run a chunk of tokens at a time."""
    flat, flat_targets = normed.flatten(0, 1), targets.flatten()
    values, indices, nll = [], [], []
    chunk = head_chunk_rows(model.config.vocab_size)
    for start in range(0, flat.shape[0], chunk):
        log_probs = torch.log_softmax(model.lm_head(flat[start:start + chunk]).float(), dim=-1)
        top = log_probs.topk(top_k, dim=-1)
        values.append(top.values)
        indices.append(top.indices)
        nll.append(-log_probs.gather(-1, flat_targets[start:start + chunk, None])[:, 0])
    shape = targets.shape
    return (torch.cat(values).view(*shape, top_k), torch.cat(indices).view(*shape, top_k),
            torch.cat(nll).view(shape))


def write_exit_cache(model: FamilyModel, shards: TokenShards, output: str | Path, *, exits: list[int] | None = None,
                     seq_len: int = 256, max_tokens: int | None = None, top_k: int = 32,
                     hidden_dtype: str = "float16", batch_size: int = 4, overwrite: bool = False,
                     progress=None) -> CacheSpec:
    """Run the frozen trunk over `shards` once and write the cache (see the module docstring).

    `exits` defaults to every exit with a branch; `max_tokens` caps the targets cached.
    """
    config = model.config
    exits = list(config.exits[:-1] if exits is None else exits)
    for e in exits:
        if e not in config.exits[:-1]:
            raise CacheError(f"exit {e} has no branch in this family (its branched exits are {config.exits[:-1]})")
    if hidden_dtype not in HIDDEN_DTYPES:
        raise CacheError(f"hidden dtype {hidden_dtype!r}: expected one of {', '.join(HIDDEN_DTYPES)}")
    if not 1 <= top_k <= config.vocab_size:
        raise CacheError(f"top_k = {top_k}: expected 1..{config.vocab_size} (the vocabulary)")
    if shards.vocab_size > config.vocab_size:
        raise CacheError(f"{shards.path}: its vocabulary ({shards.vocab_size}) is larger than the family's "
                         f"({config.vocab_size}): tokenized with another tokenizer?")
    if shards.loss_mask is not None:
        raise CacheError(f"{shards.path}: carries a loss mask (chat data): exits of a pretrained trunk "
                         f"train on plain text shards")
    windows = StreamRows(shards, seq_len, shuffle=False, loop=False).count
    rows = windows if max_tokens is None else min(windows, max(1, max_tokens // seq_len))
    # A cap takes windows spread evenly over the whole stream, not only its beginning.
    starts = int(shards.documents[0]) + (np.arange(rows) * windows // rows) * seq_len
    spec = CacheSpec(exits=exits, seq_len=seq_len, top_k=top_k, rows=rows, hidden_size=config.hidden_size,
                     vocab_size=config.vocab_size, hidden_dtype=hidden_dtype,
                     fingerprint=trunk_fingerprint(model), data=str(shards.path))
    model.eval()
    with atomic_directory(output, overwrite) as staging:
        def array(name: str, shape: tuple[int, ...], kind) -> np.memmap:
            return np.lib.format.open_memmap(staging / name, mode="w+", dtype=kind, shape=shape)

        tokens = array("tokens.npy", (rows, seq_len + 1), np.int32)
        hidden = {e: array(f"hidden-{e}.npy", (rows, seq_len, config.hidden_size), HIDDEN_DTYPES[hidden_dtype])
                  for e in exits}
        top_ids = array("top_ids.npy", (rows, seq_len, top_k), np.int32)
        top_logprobs = array("top_logprobs.npy", (rows, seq_len, top_k), np.float32)
        teacher_nll = array("teacher_nll.npy", (rows, seq_len), np.float32)
        for start in range(0, rows, batch_size):
            stop = min(start + batch_size, rows)
            window = np.stack([np.asarray(shards.tokens[b:b + seq_len + 1], dtype=np.int32)
                               for b in starts[start:stop]])
            ids = torch.from_numpy(window).long()
            states, normed = trunk_outputs(model, ids[:, :-1], exits)
            values, indices, nll = teacher_top_k(model, normed, ids[:, 1:], top_k)
            tokens[start:stop] = window
            for e in exits:
                state = states[e].float()
                if hidden_dtype == "float16" and state.abs().max() > torch.finfo(torch.float16).max:
                    raise CacheError(f"the state entering exit {e} exceeds float16's range: cache it as float32")
                hidden[e][start:stop] = state.numpy()
            top_ids[start:stop] = indices.numpy()
            top_logprobs[start:stop] = values.numpy()
            teacher_nll[start:stop] = nll.numpy()
            if progress is not None:
                progress(stop, rows)
        for memmap in (tokens, top_ids, top_logprobs, teacher_nll, *hidden.values()):
            memmap.flush()
        (staging / CACHE_JSON).write_text(json.dumps(spec.__dict__, indent=2) + "\n")
    return spec


class ExitCache:
    """A cache directory opened read-only, every array memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / CACHE_JSON
        if not manifest.is_file():
            raise CacheError(f"{self.path}: not an exit cache (no {CACHE_JSON}; write one with "
                             f"`familial exits cache`)")
        data = json.loads(manifest.read_text())
        if data.get("version") != CACHE_VERSION:
            raise CacheError(f"{manifest}: cache version {data.get('version')!r}, this familial reads "
                             f"version {CACHE_VERSION}: write the cache again")
        self.spec = CacheSpec(**data)
        rows, length, k = self.spec.rows, self.spec.seq_len, self.spec.top_k
        self.tokens = self._open("tokens.npy", (rows, length + 1))
        self.hidden = {e: self._open(f"hidden-{e}.npy", (rows, length, self.spec.hidden_size))
                       for e in self.spec.exits}
        self.top_ids = self._open("top_ids.npy", (rows, length, k))
        self.top_logprobs = self._open("top_logprobs.npy", (rows, length, k))
        self.teacher_nll = self._open("teacher_nll.npy", (rows, length))

    def _open(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        file = self.path / name
        if not file.is_file():
            raise CacheError(f"{file}: missing from the exit cache")
        array = np.load(file, mmap_mode="r")
        if array.shape != shape:
            raise CacheError(f"{file}: shape {array.shape}, expected {shape} from {CACHE_JSON}")
        return array

    @property
    def rows(self) -> int:
        return self.spec.rows

    def check_family(self, model: FamilyModel, exits: list[int], where: str = "the family") -> None:
        """Refuse a cache made from another trunk, or lacking one of `exits`."""
        missing = [e for e in exits if e not in self.spec.exits]
        if missing:
            raise CacheError(f"{self.path}: holds exits {self.spec.exits}, not {missing} (cache them with "
                             f"`familial exits cache`)")
        if self.spec.vocab_size != model.config.vocab_size or self.spec.hidden_size != model.config.hidden_size:
            raise CacheError(f"{self.path}: made for vocabulary {self.spec.vocab_size} / hidden "
                             f"{self.spec.hidden_size}, but {where} has {model.config.vocab_size} / "
                             f"{model.config.hidden_size}")
        if self.spec.fingerprint != trunk_fingerprint(model):
            raise CacheError(f"{self.path}: made from another trunk than {where}'s (trunk fingerprint "
                             f"{self.spec.fingerprint[:12]} vs {trunk_fingerprint(model)[:12]}): write the "
                             f"cache again from this family")

    def batch(self, rows: np.ndarray, exit_layer: int) -> dict[str, torch.Tensor]:
        """Rows `rows` (sorted indices) for one exit, as float32 / int64 tensors."""
        return {"hidden": torch.from_numpy(np.asarray(self.hidden[exit_layer][rows], dtype=np.float32)),
                "targets": torch.from_numpy(np.asarray(self.tokens[rows, 1:], dtype=np.int64)),
                "top_ids": torch.from_numpy(np.asarray(self.top_ids[rows], dtype=np.int64)),
                "top_logprobs": torch.from_numpy(np.asarray(self.top_logprobs[rows])),
                "teacher_nll": torch.from_numpy(np.asarray(self.teacher_nll[rows]))}
