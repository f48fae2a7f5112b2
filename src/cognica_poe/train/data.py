"""
Streaming pretraining data: documents from text / JSONL / parquet sources, BOS-prefixed, packed into rows.

Why this shape:
- Sources are streamed (text files in chunks, JSONL line by line, parquet row group by row group), so a large
  corpus is never held in memory. A document is: a text-file piece between blank lines ("\\n\\n", stripped,
  empties dropped, exactly `text.split("\\n\\n")`), a JSONL line's "text" field, or a parquet row's `text`.
- Split: a folder of 2+ files holds out its LAST file (sorted by name) as validation, like nanochat's last
  shard. A single file (or a folder with one file) holds out its last len(docs) // 20 documents (at least 1),
  as the poe-d8-classics reference run did.
- Order: the train documents are cut into blocks of `shuffle_block` documents; each epoch visits the blocks
  in order and each block in a permutation seeded by (seed, epoch, block). Deterministic given the seed, and
  resumable from (epoch, block, position in block, token offset in the document) alone.
- Packing: [BOS] + tokens of each document are concatenated and cut into non-overlapping rows of
  sequence_len + 1 tokens (inputs row[:-1], targets row[1:]); no cropping, so no token is wasted (unlike
  nanochat's best-fit packing, rows may start mid-document; every document still starts with BOS).
- Ranks: every rank reads the same global row sequence and keeps its slice of each global batch (rank r takes
  rows [r*B, (r+1)*B) of every W*B rows). Tokenization is repeated per rank (cheap next to the model), and in
  exchange the data of W ranks x batch B equals one process x batch W*B exactly, with one shared loader state.
"""

import glob
import json
import os
import random
from collections.abc import Iterable, Iterator
from importlib import resources

import torch

from ..extras import require

EXTENSIONS = (".txt", ".jsonl", ".parquet")
VAL_FRACTION = 20  # single file: the last len(docs) // 20 documents are validation


def bundled_corpus() -> str:
    """Path of the bundled tinyshakespeare.txt (inside the installed package)."""
    return str(resources.files("cognica_poe").joinpath("data", "tinyshakespeare.txt"))


# -----------------------------------------------------------------------------
# one file -> documents

def _text_docs(path: str, chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Pieces of `path` between "\\n\\n", stripped, empty ones dropped (same as reading it whole and splitting)."""
    buf = ""
    with open(path, encoding="utf-8") as f:
        try:
            while chunk := f.read(chunk_chars):
                parts = (buf + chunk).split("\n\n")
                buf = parts.pop()
                for p in parts:
                    if p := p.strip():
                        yield p
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None
    if buf := buf.strip():
        yield buf


def _not_utf8(path: str, e: UnicodeDecodeError) -> ValueError:
    return ValueError(f"{path} is not UTF-8 text ({e.reason}): a corpus is UTF-8 text, or .jsonl / .parquet with a "
                      "`text` field")


def _jsonl_docs(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {n} is not valid JSON ({e.msg}): a .jsonl corpus holds one "
                                     '{"text": ...} object per line') from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f'{path} line {n} has no "text" string: a .jsonl corpus holds one '
                                     '{"text": ...} object per line')
                yield record["text"]
        except UnicodeDecodeError as e:
            raise _not_utf8(path, e) from None


def _parquet_file(path: str):
    """pyarrow's ParquetFile of `path`, checked to have a `text` column."""
    pq = require("pyarrow.parquet", "parquet", f"reading {path}")
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable parquet file ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)}): a parquet "
                         "corpus keeps its documents in a string column named text")
    return pf


def file_docs(path: str, skip: int = 0) -> Iterator[str]:
    """The documents of one file, after skipping the first `skip` (parquet skips whole row groups unread)."""
    if path.endswith(".parquet"):
        pf = _parquet_file(path)
        for g in range(pf.num_row_groups):  # one row group in memory at a time
            n = pf.metadata.row_group(g).num_rows
            if skip >= n:
                skip -= n
                continue
            yield from pf.read_row_group(g, columns=["text"]).column("text").to_pylist()[skip:]
            skip = 0
        return
    it = _jsonl_docs(path) if path.endswith(".jsonl") else _text_docs(path)
    for i, doc in enumerate(it):
        if i >= skip:
            yield doc


def count_docs(path: str) -> int:
    if path.endswith(".parquet"):
        return _parquet_file(path).metadata.num_rows
    return sum(1 for _ in file_docs(path))


# -----------------------------------------------------------------------------
# a corpus: files + a train/val split

class Corpus:
    """
    A document source with a fixed train/val split. `path` is a file, a folder of .txt/.jsonl/.parquet files,
    or None for the bundled corpus. Documents of a split are numbered 0..n-1 and can be streamed from any index.
    """

    def __init__(self, path: str | None = None):
        path = path or bundled_corpus()
        if os.path.isdir(path):
            files = sorted(f for f in glob.glob(os.path.join(path, "*")) if f.endswith(EXTENSIONS))
            if not files:
                raise FileNotFoundError(f"no {'/'.join(EXTENSIONS)} files in {path}")
        elif os.path.isfile(path):  # any file that is not .jsonl / .parquet is read as text
            files = [path]
        else:
            raise FileNotFoundError(f"corpus {path} does not exist")
        self.path = path
        if len(files) >= 2:
            self.splits = {"train": [(f, 0, None) for f in files[:-1]], "val": [(files[-1], 0, None)]}
        else:
            n = count_docs(files[0])
            n_val = max(1, n // VAL_FRACTION)
            if n - n_val < 1:
                raise ValueError(f"{files[0]} has {n} documents: too few to hold out a validation split")
            self.splits = {"train": [(files[0], 0, n - n_val)], "val": [(files[0], n - n_val, None)]}
        self._counts: dict[str, int] = {}

    def _count(self, f: str) -> int:
        if f not in self._counts:
            self._counts[f] = count_docs(f)
        return self._counts[f]

    def num_docs(self, split: str) -> int:
        return sum((hi if hi is not None else self._count(f)) - lo for f, lo, hi in self.splits[split])

    def docs(self, split: str, start: int = 0) -> Iterator[str]:
        """Documents of `split` from index `start` on, streamed."""
        for f, lo, hi in self.splits[split]:
            n = (hi if hi is not None else self._count(f)) - lo
            if start >= n:
                start -= n
                continue
            for i, doc in enumerate(file_docs(f, lo + start)):
                if hi is not None and lo + start + i >= hi:
                    break
                yield doc
            start = 0


def token_stream(corpus: Corpus, tokenizer, split: str = "val", max_tokens: int | None = None) -> torch.Tensor:
    """1-D int64 stream of [BOS] + tokens of each document in file order (for evaluation), capped at max_tokens."""
    return documents_stream(corpus.docs(split), tokenizer, max_tokens)


def documents_stream(docs: Iterable[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """1-D int64 stream of [BOS] + tokens of each document, in order, capped at max_tokens."""
    bos = tokenizer.bos_token_id
    out: list[int] = []
    for doc in docs:
        out.append(bos)
        out.extend(tokenizer.encoding.encode_ordinary(doc))
        if max_tokens is not None and len(out) >= max_tokens:
            out = out[:max_tokens]
            break
    return torch.tensor(out, dtype=torch.long)


def last_docs(docs: list[str], tokenizer, min_tokens: int) -> list[str]:
    """The fewest documents at the end of docs whose [BOS] + tokens add up to at least min_tokens (all of them if
    fewer): e.g. the training text nearest a held-out split, to calibrate on."""
    k, n = len(docs), 0
    while k > 0 and n < min_tokens:
        k -= 1
        n += 1 + len(tokenizer.encoding.encode_ordinary(docs[k]))
    return docs[k:]


# -----------------------------------------------------------------------------
# the packed, shuffled, resumable train loader

class PackedLoader:
    """
    Rows of sequence_len + 1 tokens from the shuffled-in-blocks document stream of one split.
    `next_batch()` -> (inputs (B, T), targets (B, T)) for this rank; `state_dict()` is where the stream stands.
    """

    def __init__(self, corpus: Corpus, tokenizer, batch_size: int, seq_len: int, split: str = "train",
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_block: int = 1024,
                 device: torch.device | str = "cpu"):
        self.corpus, self.tokenizer, self.split = corpus, tokenizer, split
        self.B, self.T, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_block = shuffle_block
        self.device = torch.device(device)
        self.n_docs = corpus.num_docs(split)
        if self.n_docs == 0:
            raise ValueError(f"the {split} split of {corpus.path} has no documents")
        self.epoch, self.block, self.pos, self.offset = 0, 0, 0, 0
        self._docs: list[list[int]] | None = None  # tokenized current block, in permuted order
        self._iter: Iterator[str] | None = None  # document stream, positioned at document self._iter_at
        self._iter_at = -1

    def state_dict(self) -> dict:
        """Position of the next token: epoch, block, position in the block's permutation, token offset in that doc."""
        return dict(epoch=self.epoch, block=self.block, pos=self.pos, offset=self.offset, seed=self.seed,
                    n_docs=self.n_docs, shuffle_block=self.shuffle_block)

    def load_state_dict(self, state: dict) -> None:
        if (state["n_docs"], state["shuffle_block"], state["seed"]) != (self.n_docs, self.shuffle_block, self.seed):
            raise ValueError(f"loader state is for another stream (n_docs/shuffle_block/seed {state['n_docs']}/"
                             f"{state['shuffle_block']}/{state['seed']} vs {self.n_docs}/{self.shuffle_block}/"
                             f"{self.seed})")
        self.epoch, self.block, self.pos, self.offset = state["epoch"], state["block"], state["pos"], state["offset"]
        self._docs = None

    def _load_block(self) -> None:
        start = self.block * self.shuffle_block
        n = min(self.shuffle_block, self.n_docs - start)
        if self._iter is None or self._iter_at != start:  # only after a resume or an epoch wrap
            self._iter, self._iter_at = self.corpus.docs(self.split, start), start
        docs = [next(self._iter) for _ in range(n)]
        self._iter_at += n
        order = list(range(n))
        random.Random(f"{self.seed}/{self.epoch}/{self.block}").shuffle(order)
        bos = self.tokenizer.bos_token_id
        encoded = self.tokenizer.encoding.encode_ordinary_batch([docs[i] for i in order])
        self._docs = [[bos] + ids for ids in encoded]

    def _take(self, n: int) -> list[int]:
        """The next n tokens of the packed stream, advancing the position."""
        out: list[int] = []
        while len(out) < n:
            if self._docs is None:
                self._load_block()
            doc = self._docs[self.pos]
            piece = doc[self.offset:self.offset + n - len(out)]
            out.extend(piece)
            self.offset += len(piece)
            if self.offset == len(doc):
                self.offset, self.pos = 0, self.pos + 1
                if self.pos == len(self._docs):
                    self.pos, self.block, self._docs = 0, self.block + 1, None
                    if self.block * self.shuffle_block >= self.n_docs:
                        self.block, self.epoch = 0, self.epoch + 1
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        W, B, T = self.world_size, self.B, self.T
        rows = torch.tensor(self._take(W * B * (T + 1)), dtype=torch.long).view(W * B, T + 1)
        rows = rows[self.rank * B:(self.rank + 1) * B].to(self.device)
        return rows[:, :-1], rows[:, 1:]  # (B, T), (B, T)


def iter_tokenizer_texts(path: str | None = None, max_chars: int | None = None) -> Iterator[str]:
    """Train-split documents of a corpus for tokenizer training, up to max_chars characters in total."""
    seen = 0
    for doc in Corpus(path).docs("train"):
        yield doc
        seen += len(doc)
        if max_chars is not None and seen >= max_chars:
            return
