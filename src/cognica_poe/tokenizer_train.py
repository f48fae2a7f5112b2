"""
Train the BPE of a CognicaPoETokenizer from any iterator of texts, nanochat's way: rustbpe learns byte-level
merges with nanochat's split regex (ids 0..255 are the raw bytes, then merges in creation order), and the
9 special tokens are appended after them. Runtime encoding is tiktoken (tokenizer.py).

Kept apart from tokenizer.py because rustbpe is a training-time dependency that exported model folders
must not need.
"""

from collections.abc import Iterable

import rustbpe

from .tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, CognicaPoETokenizer, build_encoding


def train_bpe(texts: Iterable[str], vocab_size: int, doc_cap: int | None = 10_000) -> CognicaPoETokenizer:
    """A tokenizer with exactly vocab_size ids (vocab_size - 9 mergeable tokens + 9 specials)."""
    n_specials = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_specials + 1:
        raise ValueError(f"vocab_size must be at least {256 + n_specials + 1} (256 bytes + {n_specials} specials + "
                         f"one merge), got {vocab_size}")

    def capped():
        for text in texts:
            yield text[:doc_cap] if doc_cap else text

    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(capped(), vocab_size - n_specials, pattern=SPLIT_PATTERN)
    ranks = {bytes(k): v for k, v in bpe.get_mergeable_ranks()}
    if len(ranks) != vocab_size - n_specials:
        raise ValueError(f"the corpus is too small for {vocab_size} ids: only {len(ranks) + n_specials} were learned")
    return CognicaPoETokenizer.from_encoding(build_encoding(ranks))
