"""Which tokenizer made what: shards and families record the sha256 of their tokenizer.json.

Token ids mean nothing without the tokenizer that made them: a family trained or measured on
shards from another tokenizer reads valid-looking ids and learns or reports nonsense. So
`data prepare` (and every other shard writer) stores the sha256 of tokenizer.json in the
shards' manifest, a saved family lists it in family.json's `files`, and every command that
puts shards and a family (or a tokenizer) together compares the two and refuses a mismatch,
naming both. Shards written before the hash was recorded are accepted with a warning.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

from familial.config import FAMILY_CONFIG_NAME, FamilyConfig

TOKENIZER_JSON = "tokenizer.json"


class TokenizerMismatch(ValueError):
    """Shards, a family or a tokenizer that belong to different tokenizers."""


@dataclass(frozen=True)
class TokenizerRecord:
    """A tokenizer as recorded somewhere: where it was (a path) and its file's sha256."""

    where: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.where} (sha256 {self.sha256[:12]})"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_json(path: str | Path) -> Path | None:
    """tokenizer.json itself, or the one inside a directory; None when there is none."""
    path = Path(path)
    file = path / TOKENIZER_JSON if path.is_dir() else path
    return file if file.is_file() else None


def tokenizer_record(path: str | Path) -> TokenizerRecord | None:
    """The tokenizer at `path` (a tokenizer.json or a directory holding one), if there is one."""
    file = tokenizer_json(path)
    return None if file is None else TokenizerRecord(str(file), sha256_of(file))


def shards_tokenizer(shards) -> TokenizerRecord | None:
    """The tokenizer the shards' manifest records; None for shards that record no hash."""
    manifest = getattr(shards, "manifest", None) or {}
    digest = manifest.get("tokenizer_sha256")
    if not isinstance(digest, str):
        return None
    return TokenizerRecord(str(manifest.get("tokenizer") or "an unnamed tokenizer"), digest)


def family_tokenizer(directory: str | Path) -> TokenizerRecord | None:
    """The family's tokenizer: its tokenizer.json, refused if it is not the one family.json
    records; only the record when the file is gone; None when there is neither."""
    directory = Path(directory)
    found = tokenizer_record(directory / TOKENIZER_JSON)
    recorded = (FamilyConfig.load_checksums(directory) or {}).get(TOKENIZER_JSON)
    if recorded is None:
        return found
    if found is None:
        return TokenizerRecord(f"{directory / TOKENIZER_JSON} (missing; {FAMILY_CONFIG_NAME} "
                               f"records it)", recorded)
    if found.sha256 != recorded:
        raise TokenizerMismatch(f"{found.where}: has sha256 {found.sha256[:12]}, but "
                                f"{FAMILY_CONFIG_NAME} records the family's tokenizer as sha256 "
                                f"{recorded[:12]} (the tokenizer was replaced after the family was "
                                f"saved; put its own tokenizer.json back)")
    return found


def warn_unrecorded(shards, against: TokenizerRecord | None) -> None:
    """One line on stderr: these shards cannot be checked against a tokenizer."""
    which = f" against {against}" if against is not None else ""
    print(f"warning: {Path(shards.path)}: the shards record no tokenizer hash (written before "
          f"familial recorded it, or not by `familial data prepare`), so the tokenizer cannot be "
          f"checked{which}", file=sys.stderr, flush=True)


def check_shards(shards, tokenizer: TokenizerRecord | None, role: str = "the family's tokenizer",
                 fix: str = "") -> TokenizerRecord | None:
    """Refuse shards tokenised with another tokenizer than `tokenizer`; warn when the shards
    record none. Returns the shards' record."""
    recorded = shards_tokenizer(shards)
    if recorded is None:
        warn_unrecorded(shards, tokenizer)
    elif tokenizer is not None and tokenizer.sha256 != recorded.sha256:
        raise TokenizerMismatch(f"{Path(shards.path)}: tokenised with {recorded}, but {role} is "
                                f"{tokenizer}{'; ' + fix if fix else ''}")
    return recorded


def check_family_shards(family: str | Path, *shards) -> None:
    """Refuse shards tokenised with another tokenizer than the family's (eval, compare)."""
    record = family_tokenizer(family)
    for each in shards:
        check_shards(each, record, f"the tokenizer of family {family}",
                     fix="evaluate on shards prepared with the family's tokenizer")
