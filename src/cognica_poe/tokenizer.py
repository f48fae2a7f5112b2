"""
CognicaPoETokenizer: nanochat's byte-level BPE, encoded with tiktoken, behind transformers' tokenizer API.

Why a tokenizer of our own: nanochat ships its tokenizer as a pickle (loading it runs arbitrary code) and has
no transformers integration. This keeps the exact ids (raw bytes 0..255, merges in creation order, then the 9
specials) in a safe, documented format that `AutoTokenizer.from_pretrained(dir)` can load.

On disk (no pickles):
  tokenizer.tiktoken        tiktoken's text format, one line per mergeable token: "<base64(bytes)> <rank>"
  tokenizer_config.json     transformers' config plus `pat_str` (the split regex) and `special_tokens`
                            ({name: id}; always len(ranks) + index in the order of SPECIAL_TOKENS)
  token_bytes.safetensors   {"token_bytes": int32 (vocab,)}: raw bytes per id, 0 for specials (bits per byte)
  chat_template.jinja       nanochat's chat protocol (transformers 5 keeps templates in this file)
  tokenizer.json            the same BPE for the `tokenizers` library (PreTrainedTokenizerFast.from_pretrained,
                            serving stacks, transformers.js); written by every save for those readers
  tokenizer.py, atomic.py   this file and its one sibling import (atomic writes), so the folder loads with
                            AutoTokenizer(..., trust_remote_code=True)

Token strings (what `tokenize` returns) are the token's bytes through GPT-2's reversible byte-to-unicode map
(printable ASCII maps to itself, other bytes to printable code points); specials are their own text. Encoding
is tiktoken's `encode_ordinary`: special-token text typed by a user ("<|assistant_end|>" in a prompt) is plain
text, so no input can forge a control token. Only an explicit opt-in encodes it as the special id:
`allowed_special=` (a set of names or "all", tiktoken's convention) or `split_special_tokens=False`
(transformers'). `apply_chat_template(tokenize=True)` gives the ids of `render_conversation`: the template's own
specials as ids, message text as text. BOS is NOT added by default (the model card prepends it itself);
`add_bos_token=True` or `add_bos(ids)` prepend it.

This file is copied into exported remote-code folders: it imports only the standard library, torch,
transformers, safetensors, tiktoken and atomic.py (standard library only).
"""

import base64
import functools
import json
import os
import re
import shutil
from collections.abc import Collection, Iterator
from collections.abc import Set as AbstractSet

import tiktoken
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken, PaddingStrategy, TruncationStrategy
from transformers.utils.chat_template_utils import _CONTROL_TOKEN_END, _CONTROL_TOKEN_START

from .atomic import atomic_file, write_json, write_text

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""  # noqa: E501
)
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
VOCAB_FILE = "tokenizer.tiktoken"
FAST_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.safetensors"
LEGACY_TOKEN_BYTES_FILE = "token_bytes.pt"
LEGACY_PICKLE_FILE = "tokenizer.pkl"

# nanochat's chat protocol: <|bos|>, then user/assistant turns wrapped in their special tokens, no role names
# and no added newlines. A leading system message is merged into the first user message; roles must alternate.
# Assistant content may also be a list of parts ({"type": "text" | "python" | "python_output", "text": ...}).
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- if not turns -%}"
    "{{ raise_exception('a system message must be followed by a user message') }}"
    "{%- endif -%}"
    "{%- else -%}{%- set system = none -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{ raise_exception('roles must alternate user/assistant (after an optional leading system message)') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{%- if loop.first and system is not none -%}{{- system ~ '\\n\\n' -}}{%- endif -%}"
    "{{- message['content'] -}}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- else -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (names for byte-level tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def tokenizer_auto_map() -> list:
    """
    The `auto_map["AutoTokenizer"]` entry of tokenizer_config.json for remote code. transformers 5.24 reads it
    as [slow class, fast class] (it indexes [1] then [0]); a plain string would be indexed character-wise.
    """
    return ["tokenizer.CognicaPoETokenizer", None]


# -----------------------------------------------------------------------------
# long whitespace: tiktoken's regex engine panics on it

# Unicode White_Space but \r and \n: the split regex's \s (Python's \s would add \x1c-\x1f)
BLANKS = "\t\x0b\x0c \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
LONG_WHITESPACE = 100_000  # runs of blanks this long are cut out (the engine fails near 1M)


@functools.lru_cache(maxsize=4)
def _blank_run_patterns(n: int) -> tuple[re.Pattern, re.Pattern]:
    # a run of n blanks puts min(n, 8) blanks in a row among every (n // 8)-th character: a cheap first test
    return re.compile(f"[{BLANKS}]{{{min(n, 8)}}}"), re.compile(f"(?<![{BLANKS}])[{BLANKS}]{{{n},}}")


def whitespace_parts(text: str) -> Iterator[tuple[str, bool]]:
    r"""
    text as consecutive parts whose ids, concatenated, are the ids of the whole text: (part, False) for text that
    tiktoken encodes as usual, (run, True) for a run of LONG_WHITESPACE+ blanks that the split regex takes as one
    piece, to byte-pair encode whole. Why: the regex backtracks over such a run (`\s*[\r\n]` looking for a
    newline) and past about a million characters tiktoken's engine overflows its stack, a Rust panic.

    Why the cuts are exact: a maximal run of blanks [s, e) followed by a non-space (or the end) starts a piece
    (before it is a newline, which ends the regex's whitespace piece, or a non-space, which no piece extends into
    a blank). From s the regex takes `\s+(?!\S)`: the run but its last blank, which joins the next piece (the whole
    run at the end of the text). The regex only looks ahead, so the text after a cut splits as in the whole text.
    A run followed by a newline is left alone: the regex takes it up to the newline without backtracking.
    """
    sampled, runs = _blank_run_patterns(LONG_WHITESPACE)
    if len(text) < LONG_WHITESPACE or not sampled.search(text[::max(1, LONG_WHITESPACE // 8)]):
        if text:
            yield text, False
        return
    start = 0
    for m in runs.finditer(text):
        s, e = m.span()
        if e < len(text) and text[e] in "\r\n":
            continue
        end = e if e == len(text) else e - 1
        if s > start:
            yield text[start:s], False
        yield text[s:end], True
        start = end
    if start < len(text):
        yield text[start:], False


def is_rust_panic(e: BaseException) -> bool:
    """A panic inside a pyo3 extension (tiktoken, rustbpe): raised as a BaseException, so `except Exception`
    misses it."""
    return type(e).__name__ == "PanicException" and type(e).__module__ == "pyo3_runtime"


def _engine(fn, text: str, **kwargs) -> list[int]:
    """fn(text): a tiktoken engine panic becomes a ValueError that names the text."""
    try:
        return fn(text, **kwargs)
    except BaseException as e:
        if not is_rust_panic(e):
            raise
        raise ValueError(f"cannot tokenize a text of {len(text):,} characters starting {text[:40]!r}: tiktoken's "
                         f"engine failed ({e})") from e


class CognicaPoEEncoding(tiktoken.Encoding):
    """
    tiktoken's Encoding that tokenizes any text: runs of blanks too long for its regex engine are cut out and
    byte-pair encoded whole (same ids), and any other engine panic is a ValueError. Everything that encodes
    through `tokenizer.encoding` (the training loader, evaluation streams) gets this; the batch methods call these.
    """

    def encode_ordinary(self, text: str) -> list[int]:
        ids = []
        for part, whole in whitespace_parts(text):
            ids += self._encode_single_piece(part) if whole else _engine(super().encode_ordinary, part)
        return ids

    def encode(self, text: str, *, allowed_special: str | AbstractSet[str] = frozenset(),
               disallowed_special: str | Collection[str] = "all") -> list[int]:
        if not any(whole for _, whole in whitespace_parts(text)):
            return _engine(super().encode, text, allowed_special=allowed_special,
                           disallowed_special=disallowed_special)
        # tiktoken's rules on special-token text, then the text between allowed specials as ordinary text
        allowed = self.special_tokens_set if allowed_special == "all" else frozenset(allowed_special)
        disallowed = self.special_tokens_set - allowed if disallowed_special == "all" else disallowed_special
        found = [t for t in disallowed if t in text]
        if found:
            tiktoken.core.raise_disallowed_special_token(min(found, key=text.index))
        parts = re.split("(" + "|".join(map(re.escape, allowed)) + ")", text) if allowed else [text]
        ids = []
        for i, part in enumerate(parts):
            ids += [self._special_tokens[part]] if i % 2 else self.encode_ordinary(part)
        return ids


# -----------------------------------------------------------------------------
# the encoding and its files

def build_encoding(mergeable_ranks: dict[bytes, int], pat_str: str = SPLIT_PATTERN,
                   name: str = "cognica_poe") -> CognicaPoEEncoding:
    """A tiktoken Encoding with the 9 specials placed right after the mergeable ranks."""
    n = len(mergeable_ranks)
    if sorted(mergeable_ranks.values()) != list(range(n)):
        raise ValueError("mergeable ranks must be exactly 0..N-1, one token per rank")
    specials = {tok: n + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return CognicaPoEEncoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks,
                              special_tokens=specials)


def mergeable_ranks_of(encoding: tiktoken.Encoding) -> dict[bytes, int]:
    """The {token bytes: rank} table (tiktoken keeps it as a private attribute; it has no public getter)."""
    return encoding._mergeable_ranks


def write_ranks(path: str, mergeable_ranks: dict[bytes, int]) -> None:
    """Write tiktoken's text format: '<base64(bytes)> <rank>' per line, in rank order (atomically)."""
    with atomic_file(path, "w", encoding="ascii", newline="\n") as f:
        for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")


def read_ranks(path: str) -> dict[bytes, int]:
    """Parse a tokenizer.tiktoken file; a malformed line is a ValueError naming the file and line."""
    ranks = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:  # binascii.Error is a ValueError
                msg = f"{path}:{lineno}: not a '<base64 bytes> <rank>' line: {line[:80]!r} ({e})"
                raise ValueError(msg) from e
    return ranks


def token_bytes_of(encoding: tiktoken.Encoding) -> torch.Tensor:
    """int32 (vocab,): raw byte length of every id, 0 for the special tokens."""
    lengths = [0] * encoding.n_vocab
    for token, rank in mergeable_ranks_of(encoding).items():
        lengths[rank] = len(token)
    return torch.tensor(lengths, dtype=torch.int32)


def load_token_bytes(path_or_dir: str) -> torch.Tensor:
    """int32 token_bytes from token_bytes.safetensors, or a legacy token_bytes.pt (loaded weights_only)."""
    path = str(path_or_dir)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in (TOKEN_BYTES_FILE, LEGACY_TOKEN_BYTES_FILE)
                 if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"neither {TOKEN_BYTES_FILE} nor {LEGACY_TOKEN_BYTES_FILE} in {path}")
        path = found[0]
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True).to(torch.int32)
    return load_file(path)["token_bytes"].to(torch.int32)


def fast_tokenizer(encoding: tiktoken.Encoding, add_bos_token: bool = False):
    """
    The same BPE as a `tokenizers` Tokenizer (what tokenizer.json holds), built by transformers' tiktoken converter:
    byte-level BPE whose merges are every split of a token at that token's rank, the split regex, and the 9
    specials as added tokens at their ids (BOS prepended by its post-processor with add_bos_token, where fast
    tokenizers keep that setting). Like every tokenizer.json it matches special-token text in its input (serving
    stacks render the chat template to text, then encode it); `encode_special_tokens = True` (transformers'
    split_special_tokens=True) gives this tokenizer's default, where that text stays text.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter, processors  # (tokenizers' processors)

    ranks = mergeable_ranks_of(encoding)
    converter = TikTokenConverter(pattern=encoding._pat_str, extra_special_tokens=SPECIAL_TOKENS)
    converter.load_tiktoken_bpe = lambda _: ranks  # the table is in memory (its file loader caches by path)
    fast = converter.converted()
    if [fast.token_to_id(t) for t in SPECIAL_TOKENS] != [encoding._special_tokens[t] for t in SPECIAL_TOKENS]:
        raise ValueError("the tiktoken converter placed the special tokens at other ids")
    if add_bos_token:
        bos = SPECIAL_TOKENS[0]
        fast.post_processor = processors.Sequence([fast.post_processor, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, fast.token_to_id(bos))])])
    return fast


@functools.lru_cache(maxsize=16)
def _tokens_pattern(tokens: tuple[str, ...]) -> re.Pattern:
    """A regex that captures any of tokens (given longest first)."""
    return re.compile("(" + "|".join(map(re.escape, tokens)) + ")")


def _missing_vocab_message(where) -> str:
    msg = f"no tokenizer vocabulary: looked for {VOCAB_FILE} (with tokenizer_config.json) in {str(where)!r}"
    if where and os.path.isfile(os.path.join(str(where), LEGACY_PICKLE_FILE)):
        msg += (f"; found nanochat's {LEGACY_PICKLE_FILE}, which needs a one-time opt-in conversion: "
                "cognica_poe.nanochat.load_legacy_pickle(path, allow_pickle=True).save_pretrained(dir) "
                "(or the converter's --allow-pickle)")
    return msg


# -----------------------------------------------------------------------------
# the transformers tokenizer

class CognicaPoETokenizer(PreTrainedTokenizer):
    """nanochat's tokenizer as a transformers python-backend tokenizer; `.encoding` is tiktoken's."""

    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, pat_str: str = SPLIT_PATTERN,
                 add_bos_token: bool = False, encoding: tiktoken.Encoding | None = None,
                 bos_token: str = "<|bos|>", eos_token: str = "<|assistant_end|>", pad_token: str = "<|bos|>",
                 padding_side: str = "left",
                 special_tokens: dict[str, int] | None = None, **kwargs):
        if encoding is None:
            if vocab_file is None or not os.path.isfile(vocab_file):
                raise FileNotFoundError(_missing_vocab_message(kwargs.get("name_or_path") or vocab_file))
            encoding = build_encoding(read_ranks(vocab_file), pat_str)
        if not isinstance(encoding, CognicaPoEEncoding):  # same tables, an encoding that takes any text
            encoding = CognicaPoEEncoding(name=encoding.name, pat_str=encoding._pat_str,
                                          mergeable_ranks=mergeable_ranks_of(encoding),
                                          special_tokens=encoding._special_tokens)
        self.encoding = encoding
        self.add_bos_token = add_bos_token
        self._n_mergeable = encoding.n_vocab - len(SPECIAL_TOKENS)
        self._special_ids = {name: encoding.encode_single_token(name) for name in SPECIAL_TOKENS}
        expected = {name: self._n_mergeable + i for i, name in enumerate(SPECIAL_TOKENS)}
        if self._special_ids != expected or (special_tokens is not None and dict(special_tokens) != expected):
            got = self._special_ids if special_tokens is None else special_tokens
            raise ValueError(f"special token ids must be len(mergeable_ranks) + index: expected {expected}, "
                             f"got {got}")
        self._id_to_str = ["".join(BYTE_ENCODER[b] for b in token) for token in self._ordered_tokens()]
        self._id_to_str += SPECIAL_TOKENS
        self._str_to_id = {s: i for i, s in enumerate(self._id_to_str)}
        self._added_tokens_decoder = {i: AddedToken(name, special=True, normalized=False)
                                      for name, i in self._special_ids.items()}
        kwargs.pop("added_tokens_decoder", None)  # always the 9 specials, at fixed ids
        # the other specials are extra special tokens, so that all_special_ids (skip_special_tokens) has all 9
        extra = [t for t in SPECIAL_TOKENS if t not in (bos_token, eos_token)]
        kwargs.setdefault("extra_special_tokens", extra)
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("split_special_tokens", True)  # special-token text in the input is text (see _matched)
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         padding_side=padding_side, pat_str=encoding._pat_str, add_bos_token=add_bos_token,
                         special_tokens=dict(expected),
                         special_tokens_pattern="bos" if add_bos_token else "none", **kwargs)

    def _ordered_tokens(self) -> list[bytes]:
        tokens = [b""] * self._n_mergeable
        for token, rank in mergeable_ranks_of(self.encoding).items():
            tokens[rank] = token
        return tokens

    @classmethod
    def from_encoding(cls, encoding: tiktoken.Encoding, **kwargs) -> "CognicaPoETokenizer":
        """Wrap a tiktoken Encoding with nanochat's layout (e.g. freshly trained, or from a legacy pickle)."""
        missing = [t for t in SPECIAL_TOKENS if t not in encoding.special_tokens_set]
        if missing:
            raise ValueError(f"encoding lacks the special tokens {missing}")
        return cls(encoding=encoding, pat_str=encoding._pat_str, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader; a local folder without tokenizer.tiktoken is a FileNotFoundError."""
        path = str(pretrained_model_name_or_path)
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, VOCAB_FILE)):
            raise FileNotFoundError(_missing_vocab_message(path))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    @classmethod
    def _from_pretrained(cls, resolved_vocab_files, *args, **kwargs):
        # with a tokenizer.json present transformers drops add_bos_token from the config (a fast tokenizer keeps it
        # in its post-processor): read ours back unless the caller gave one
        config = resolved_vocab_files.get("tokenizer_config_file")
        if config and "add_bos_token" not in kwargs:
            with open(config, encoding="utf-8") as f:
                kwargs["add_bos_token"] = bool(json.load(f).get("add_bos_token", False))
        return super()._from_pretrained(resolved_vocab_files, *args, **kwargs)

    # --- vocabulary

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return {**self._str_to_id, **self._added_tokens_encoder}

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self._str_to_id:
            raise KeyError(f"unknown token {token!r} (this tokenizer has no unk token)")
        return self._str_to_id[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_str[index]

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab,): raw byte length of every id, 0 for specials (the bits-per-byte denominators)."""
        if getattr(self, "_token_bytes", None) is None:
            self._token_bytes = token_bytes_of(self.encoding)
        return self._token_bytes

    # --- encoding

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._id_to_str[i] for i in self.encoding.encode_ordinary(text)]

    def _matched(self, allowed_special=None, split_special_tokens: bool | None = None) -> tuple[str, ...]:
        """
        The added-token strings that encoding turns into their ids, longest first: tokens a user added as plain
        tokens always, special tokens only when allowed, by `allowed_special` (a set of names or "all") or
        `split_special_tokens=False`. By default special-token text is text: no input can forge a control token.
        """
        special = {t for t, i in self._added_tokens_encoder.items() if self._added_tokens_decoder[i].special}
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        if allowed_special is None:
            allowed = set() if split else special
        elif allowed_special == "all":
            allowed = special
        else:
            allowed = {allowed_special} if isinstance(allowed_special, str) else set(allowed_special)
            if unknown := sorted(allowed - special):
                raise ValueError(f"allowed_special: {unknown} are not special tokens of this tokenizer; name some "
                                 f"of {sorted(special)} or pass 'all'")
        return tuple(sorted(set(self._added_tokens_encoder) - special | allowed, key=len, reverse=True))

    def _encode_text(self, text: str, matched: tuple[str, ...] = ()) -> list[int]:
        """Ids of text: the `matched` added-token strings become their ids, the rest is encode_ordinary."""
        if not matched:
            return self.encoding.encode_ordinary(text)
        ids = []
        for i, piece in enumerate(_tokens_pattern(matched).split(text)):
            if i % 2:
                ids.append(self._added_tokens_encoder[piece])
            elif piece:
                ids += self.encoding.encode_ordinary(piece)
        return ids

    def _encode_marked_chat(self, chat: str) -> list[int]:
        """
        Ids of a chat that apply_chat_template rendered from marked inputs: transformers wraps every control token
        spelled inside a message (or tool, document) in private-use markers, so the template's own tokens are the
        unmarked ones. Those become ids; marked ones stay text, joined to the text around them, so each stretch
        between two template tokens is encoded in one go, as render_conversation encodes a message.
        """
        tokens = _tokens_pattern(tuple(sorted(self._added_tokens_encoder, key=len, reverse=True))).pattern
        start, end = re.escape(_CONTROL_TOKEN_START), re.escape(_CONTROL_TOKEN_END)
        pieces = re.split(f"{start}{tokens}{end}|[{start}{end}]|{tokens}", chat)  # text, marked, template, ...
        ids, text = [], ""
        for i in range(0, len(pieces), 3):
            text += pieces[i]
            marked, token = pieces[i + 1:i + 3] if i + 1 < len(pieces) else (None, None)
            if marked is not None:
                text += marked
            elif token is not None:
                ids += self.encoding.encode_ordinary(text) + [self._added_tokens_encoder[token]]
                text = ""
        return ids + self.encoding.encode_ordinary(text)

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Token strings of text, by the same rules as encoding (special-token text is text unless allowed)."""
        matched = self._matched(kwargs.pop("allowed_special", None), kwargs.pop("split_special_tokens", None))
        return self.convert_ids_to_tokens(self._encode_text(text, matched))

    def _encode_plus(self, text, text_pair=None, **kwargs):
        """
        Plain strings: ids straight from tiktoken, no per-token python strings (special-token text as text unless
        allowed); a chat from apply_chat_template (sanitize_control_tokens) as render_conversation encodes it.
        """
        if not (isinstance(text, str) and (text_pair is None or isinstance(text_pair, str))) \
                or kwargs.get("is_split_into_words"):
            return super()._encode_plus(text, text_pair=text_pair, **kwargs)
        if kwargs.get("sanitize_control_tokens"):
            encode = self._encode_marked_chat
        else:
            matched = self._matched(kwargs.get("allowed_special"), kwargs.get("split_special_tokens"))
            encode = functools.partial(self._encode_text, matched=matched)
        ids = encode(text)
        pair_ids = None if text_pair is None else encode(text_pair)
        return self.prepare_for_model(
            ids, pair_ids=pair_ids, add_special_tokens=kwargs.get("add_special_tokens", True),
            padding=kwargs.get("padding_strategy", PaddingStrategy.DO_NOT_PAD).value,
            truncation=kwargs.get("truncation_strategy", TruncationStrategy.DO_NOT_TRUNCATE).value,
            max_length=kwargs.get("max_length"), stride=kwargs.get("stride", 0),
            pad_to_multiple_of=kwargs.get("pad_to_multiple_of"), padding_side=kwargs.get("padding_side"),
            return_tensors=kwargs.get("return_tensors"), prepend_batch_axis=True,
            return_attention_mask=kwargs.get("return_attention_mask"),
            return_token_type_ids=kwargs.get("return_token_type_ids"),
            return_overflowing_tokens=kwargs.get("return_overflowing_tokens", False),
            return_special_tokens_mask=kwargs.get("return_special_tokens_mask", False),
            return_length=kwargs.get("return_length", False), verbose=kwargs.get("verbose", True))

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        out = bos + list(token_ids_0)
        if token_ids_1 is not None:
            out += bos + list(token_ids_1)
        return out

    def add_bos(self, ids: list[int] | list[list[int]]) -> list[int] | list[list[int]]:
        """Prepend BOS to a list of ids (or to each list in a list of lists) where it is missing."""
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.add_bos(row) for row in ids]
        ids = list(ids)
        return ids if ids[:1] == [self.bos_token_id] else [self.bos_token_id, *ids]

    # --- decoding

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        for t in tokens:
            out += t.encode("utf-8") if t in self._added_tokens_encoder else bytes(BYTE_DECODER[c] for c in t)
        return out.decode("utf-8", errors="replace")

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            special = set(self.all_special_ids)
            ids = [i for i in ids if i not in special]
        n = self.encoding.n_vocab
        if all(i < n for i in ids):
            return self.encoding.decode(ids, errors="replace")
        out = bytearray()  # user-added tokens live past the encoding's vocabulary
        for i in ids:
            out += self.encoding.decode_single_token_bytes(i) if i < n else \
                self._added_tokens_decoder[i].content.encode("utf-8")
        return out.decode("utf-8", errors="replace")

    # --- chat

    def apply_chat_template(self, conversation, tools=None, documents=None, chat_template=None,
                            add_generation_prompt: bool = False, continue_final_message: bool = False,
                            tokenize: bool = True, sanitize_control_tokens: bool | None = None, **kwargs):
        """
        transformers' chat rendering with message text kept as text: tokenize=True gives render_conversation's
        ids (the template's special tokens as ids, special-token text inside messages as text); tokenize=False
        returns the template's text. sanitize_control_tokens=False is the explicit opt-in to encode that text with
        every special allowed, so that special-token text inside a message becomes a control token.
        """
        if sanitize_control_tokens is None:
            sanitize_control_tokens = bool(tokenize)
        if tokenize and not sanitize_control_tokens:
            kwargs["tokenizer_kwargs"] = {"allowed_special": "all", **(kwargs.get("tokenizer_kwargs") or {})}
        return super().apply_chat_template(
            conversation, tools=tools, documents=documents, chat_template=chat_template,
            add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
            tokenize=tokenize, sanitize_control_tokens=sanitize_control_tokens, **kwargs)

    def render_conversation(self, messages: list[dict] | dict, max_tokens: int | None = None
                            ) -> tuple[list[int], list[int]]:
        """
        nanochat's chat rendering -> (ids, mask), mask 1 exactly on what the assistant writes: its content and
        <|assistant_end|> (python tool calls included, tool outputs excluded). A leading system message is
        merged into the first user turn; then roles must alternate user/assistant. Content is encoded as plain
        text (special-token text inside a message never becomes a special id), consecutive text parts as one text
        (as the chat template writes them). Truncated to max_tokens. apply_chat_template gives the same ids.
        """
        messages = list(messages["messages"] if isinstance(messages, dict) else messages)
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            messages = [merged, *messages[2:]]
        s = self._special_ids
        ids, mask = [s["<|bos|>"]], [0]

        def add(tokens: list[int], m: int):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        for i, message in enumerate(messages):
            expected = ("user", "assistant")[i % 2]
            if message["role"] != expected:
                raise ValueError(f"message {i} has role {message['role']!r}, expected {expected!r}: roles "
                                 "must alternate user/assistant (after an optional leading system message)")
            content = message["content"]
            if expected == "user":
                add([s["<|user_start|>"], *self.encoding.encode_ordinary(content), s["<|user_end|>"]], 0)
                continue
            add([s["<|assistant_start|>"]], 0)
            text = ""  # consecutive text parts, encoded together
            for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
                if part["type"] == "text":
                    text += part["text"]
                    continue
                add(self.encoding.encode_ordinary(text), 1)
                text, body = "", self.encoding.encode_ordinary(part["text"])
                if part["type"] == "python":
                    add([s["<|python_start|>"], *body, s["<|python_end|>"]], 1)
                elif part["type"] == "python_output":
                    add([s["<|output_start|>"], *body, s["<|output_end|>"]], 0)
                else:
                    raise ValueError(f"unknown assistant content part type {part['type']!r}")
            add(self.encoding.encode_ordinary(text), 1)
            add([s["<|assistant_end|>"]], 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    # --- saving

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path = os.path.join(save_directory, prefix + VOCAB_FILE)
        bytes_path = os.path.join(save_directory, prefix + TOKEN_BYTES_FILE)
        write_ranks(vocab_path, mergeable_ranks_of(self.encoding))
        save_file({"token_bytes": self.token_bytes().contiguous()}, bytes_path)
        return (vocab_path, bytes_path)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """
        transformers' save, plus our keys in tokenizer_config.json, tokenizer.json (the same BPE for the
        `tokenizers` library) and this file (for remote code).
        """
        files = super().save_pretrained(save_directory, *args, **kwargs)
        prefix = kwargs.get("filename_prefix")
        prefix = f"{prefix}-" if prefix else ""
        fast = os.path.join(save_directory, prefix + FAST_FILE)
        write_text(fast, fast_tokenizer(self.encoding, self.add_bos_token).to_str(pretty=True))
        path = os.path.join(save_directory, prefix + "tokenizer_config.json")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
        config["add_bos_token"] = self.add_bos_token  # transformers' base class leaves it out
        # our default (special-token text is text) lives in this class: PreTrainedTokenizerFast reads the same
        # file and must keep matching the specials that a rendered chat template writes
        config.pop("split_special_tokens", None)
        config["auto_map"] = {"AutoTokenizer": tokenizer_auto_map()}
        write_json(path, config)
        here = os.path.dirname(os.path.abspath(__file__))
        for name in ("tokenizer.py", "atomic.py"):  # this file and the module it imports
            code = os.path.join(save_directory, name)
            if not (os.path.exists(code) and os.path.samefile(code, os.path.join(here, name))):
                shutil.copyfile(os.path.join(here, name), code)
        return (*files, fast)
