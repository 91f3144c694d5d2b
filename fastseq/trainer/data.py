"""Text that needs no download, two tokenizers, and the language-model batches cut from it.

The default corpus is the English help text that ships with Python itself: the ``pydoc_data``
help topics (what ``help("with")`` prints), joined in sorted key order, about 465K characters of
technical prose and code.  ``--data FILE`` replaces it with any UTF-8 file.  The last 10% of the
characters are the validation split, the rest the training split.

Both tokenizers share five special tokens (padding, unknown, begin / end of sequence, and the
masked-LM mask): ``ByteTokenizer`` maps the UTF-8 bytes 0..255 to ids 0..255 and puts the
specials after them; ``CharTokenizer`` puts the specials first, then every character of the
training text in code-point order, so the same text always gives the same ids, and a character
it never saw becomes ``<unk>``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<mask>")
VALIDATION_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------

def python_help_text() -> str:
    """The help topics of ``pydoc_data.topics`` joined in sorted key order (~465K characters)."""
    from pydoc_data.topics import topics
    return "".join(topics[k] for k in sorted(topics))


def load_text(path: Optional[str] = None) -> str:
    """``path``'s UTF-8 text, or Python's help text when ``path`` is None."""
    if path is None:
        return python_help_text()
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if len(text) < 1000:
        raise ValueError(f"--data {path!r} holds {len(text)} characters; at least 1000 are needed")
    return text


def split_text(text: str, validation_fraction: float = VALIDATION_FRACTION) -> Tuple[str, str]:
    """(train, validation): the last ``validation_fraction`` of the characters is validation."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction!r}")
    cut = int(len(text) * (1.0 - validation_fraction))
    return text[:cut], text[cut:]


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------

class _Specials:
    """Ids of the special tokens as attributes: pad_id, unk_id, bos_id, eos_id, mask_id."""

    def _set_special_ids(self, first: int) -> None:
        for i, name in enumerate(SPECIALS):
            setattr(self, name.strip("<>") + "_id", first + i)
        self.special_ids = tuple(range(first, first + len(SPECIALS)))


class ByteTokenizer(_Specials):
    """UTF-8 bytes: ids 0..255 are the bytes, 256..260 the specials.  Any text round-trips."""

    kind = "byte"

    def __init__(self):
        self._set_special_ids(256)

    def __len__(self) -> int:
        return 256 + len(SPECIALS)

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special ids are dropped, a broken UTF-8 sequence becomes U+FFFD."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def state(self) -> Dict:
        return {"kind": self.kind}


class CharTokenizer(_Specials):
    """Characters: ids 0..4 are the specials, then ``chars`` in the given order."""

    kind = "char"

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer: chars holds a character twice")
        self.chars = chars
        self._set_special_ids(0)
        self._id = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        """Every character of ``text``, in code-point order (deterministic for a given text)."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> List[int]:
        unk = self.unk_id
        return [self._id.get(c, unk) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; special ids are dropped."""
        n = len(SPECIALS)
        return "".join(self.chars[i - n] for i in ids if i >= n)

    def state(self) -> Dict:
        return {"kind": self.kind, "chars": self.chars}


def tokenizer_from_state(state: Dict):
    """The tokenizer that ``tokenizer.state()`` describes (checkpoints store it)."""
    if state.get("kind") == "byte":
        return ByteTokenizer()
    if state.get("kind") == "char":
        return CharTokenizer(state["chars"])
    raise ValueError(f"unknown tokenizer state {state!r}")


def build_tokenizer(kind: str, train_text: str):
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_text(train_text)
    raise ValueError(f"--tokenizer must be 'char' or 'byte', got {kind!r}")


# ---------------------------------------------------------------------------------------------
# Language-model batches
# ---------------------------------------------------------------------------------------------

def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one training step: batches depend only on (seed, step), so a resumed run
    and every DDP rank draw exactly the batches an uninterrupted single-process run draws."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def random_windows(ids: Tensor, batch_size: int, length: int, generator: torch.Generator) -> Tensor:
    """``batch_size`` windows of ``length`` consecutive ids at random offsets: (B, length)."""
    if ids.numel() < length + 1:
        raise ValueError(f"the text has {ids.numel()} tokens; a window of {length} needs more")
    starts = torch.randint(0, ids.numel() - length + 1, (batch_size,), generator=generator)
    return torch.stack([ids[s:s + length] for s in starts.tolist()])            # (B, length)


def consecutive_windows(ids: Tensor, length: int) -> Tensor:
    """The text cut into non-overlapping windows of ``length`` ids (the tail that does not fill
    one is dropped): (N, length).  Validation reads every window once."""
    n = ids.numel() // length
    if n == 0:
        raise ValueError(f"the validation text has {ids.numel()} tokens, fewer than one window of {length}")
    return ids[:n * length].view(n, length)                                     # (N, length)
