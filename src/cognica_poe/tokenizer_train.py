"""
Train a CognicaPoETokenizer's BPE from any iterator of texts, nanochat's way: rustbpe learns byte-level
merges with nanochat's split regex (ids 0..255 are the raw bytes in identity order, then the merges in
creation order) and the 9 special tokens follow them. Runtime encoding is tiktoken (tokenizer.py).

Kept apart from tokenizer.py because rustbpe is a training-time dependency that exported model folders must
not need.
"""

from collections.abc import Iterable, Iterator

import rustbpe

from .tokenizer import (
    LONG_WHITESPACE,
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    CognicaPoETokenizer,
    build_encoding,
    is_rust_panic,
    whitespace_parts,
)


def train_bpe(text_iterator: Iterable[str], vocab_size: int, doc_cap: int | None = 10_000,
              pattern: str = SPLIT_PATTERN) -> CognicaPoETokenizer:
    """
    A tokenizer with exactly vocab_size ids: vocab_size - 9 mergeable tokens (256 bytes + merges) then the 9
    specials. Each text is cropped to doc_cap characters (nanochat's --doc-cap; None keeps it whole).
    """
    n_specials = len(SPECIAL_TOKENS)
    if vocab_size <= 256 + n_specials:
        raise ValueError(f"vocab_size must exceed 256 + {n_specials} = {256 + n_specials} (the raw bytes and "
                         f"the special tokens, leaving room for merges), got {vocab_size}")

    def cropped() -> Iterator[str]:
        # rustbpe's regex engine panics on the runs of blanks that tiktoken's does: those go in as texts of
        # their own, in slices short enough for it (the merges then see a few pairs fewer in such a run)
        for text in text_iterator:
            for part, whole in whitespace_parts(text[:doc_cap] if doc_cap else text):
                yield from (part[i:i + LONG_WHITESPACE] for i in range(0, len(part), LONG_WHITESPACE)) if whole \
                    else [part]

    bpe = rustbpe.Tokenizer()
    try:
        bpe.train_from_iterator(cropped(), vocab_size - n_specials, pattern=pattern)
    except BaseException as e:
        if not is_rust_panic(e):
            raise
        raise ValueError(f"rustbpe failed on the training text ({e})") from e
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    if len(ranks) != vocab_size - n_specials:
        needed = vocab_size - n_specials - 256
        raise ValueError(f"the training text is too small for vocab_size {vocab_size}: only "
                         f"{len(ranks) - 256} merges could be learned (needed {needed})")
    if any(ranks.get(bytes([b])) != b for b in range(256)):
        raise ValueError("rustbpe did not put the raw bytes at ids 0..255")
    return CognicaPoETokenizer.from_encoding(build_encoding(ranks, pattern))
