"""
CognicaPoETokenizer: nanochat's byte-level BPE, encoded with tiktoken, behind transformers' tokenizer API.

On disk (safe, documented, no pickles):
  tokenizer.tiktoken        tiktoken's text format: one line per mergeable token, "<base64 of its bytes> <rank>"
                            (ids 0..255 are the raw bytes, then the merges in creation order)
  tokenizer_config.json     transformers' config, plus `pat_str` (the split regex); the 9 special tokens follow
                            the mergeable ranks in the fixed order of SPECIAL_TOKENS
  token_bytes.safetensors   {"token_bytes": int32 (vocab,)}: bytes per id, 0 for specials (for bits per byte)

Token strings (what `tokenize` returns) are the token's bytes through GPT-2's reversible byte-to-unicode map,
so every token has a printable name and decoding is exact. Encoding plain text never turns special-token
text into specials unless it appears as a whole added token (transformers' usual behaviour, which is what a
chat template relies on). Like the model card's usage, BOS is NOT added by default (`add_bos_token=True`
or `add_bos(ids)` prepend it).

nanochat's `tokenizer.pkl` is a pickled tiktoken.Encoding: unpickling runs arbitrary code, so
`load_legacy_pickle` refuses unless the caller opts in; convert once, then use the safe format.

This file is copied into exported remote-code folders: it imports only torch/transformers/safetensors/tiktoken.
"""

import base64
import json
import os

import tiktoken
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
VOCAB_FILE = "tokenizer.tiktoken"
TOKEN_BYTES_FILE = "token_bytes.safetensors"

# nanochat's chat protocol: <|bos|>, then user/assistant turns wrapped in their special tokens; a leading
# system message is merged into the first user message.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>{%- if ns.system -%}{{ ns.system ~ '\\n\\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ message['content'] }}<|user_end|>"
    "{%- elif message['role'] == 'assistant' -%}"
    "<|assistant_start|>{{ message['content'] }}<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


BYTE_ENCODER = bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


# -----------------------------------------------------------------------------
# the encoding and its files

def build_encoding(mergeable_ranks: dict[bytes, int], pat_str: str = SPLIT_PATTERN,
                   name: str = "cognica_poe") -> tiktoken.Encoding:
    """A tiktoken Encoding with the 9 specials placed right after the mergeable ranks."""
    offset = len(mergeable_ranks)
    if sorted(mergeable_ranks.values()) != list(range(offset)):
        raise ValueError("mergeable ranks must be exactly 0..N-1")
    specials = {tok: offset + i for i, tok in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=specials)


def write_ranks(path: str, mergeable_ranks: dict[bytes, int]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    os.replace(tmp, path)


def read_ranks(path: str) -> dict[bytes, int]:
    """Parse tokenizer.tiktoken; a malformed line is a ValueError naming the file and line."""
    ranks = {}
    with open(path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a '<base64> <rank>' line ({e})") from e
    return ranks


def token_bytes_of(encoding: tiktoken.Encoding) -> torch.Tensor:
    """int32 (vocab,): raw byte length of every id, 0 for the special tokens."""
    special = set(encoding.special_tokens_set)
    out = torch.zeros(encoding.n_vocab, dtype=torch.int32)
    for i in range(encoding.n_vocab):
        try:
            tok = encoding.decode_single_token_bytes(i)
        except KeyError:
            continue
        if tok.decode("latin-1") not in special:
            out[i] = len(tok)
    for name in special:
        out[encoding.encode_single_token(name)] = 0
    return out


def load_token_bytes(path_or_dir: str) -> torch.Tensor:
    """token_bytes from token_bytes.safetensors, or a legacy token_bytes.pt (read with weights_only=True)."""
    path = path_or_dir
    if os.path.isdir(path):
        for name in (TOKEN_BYTES_FILE, "token_bytes.pt"):
            if os.path.isfile(os.path.join(path_or_dir, name)):
                path = os.path.join(path_or_dir, name)
                break
        else:
            raise FileNotFoundError(f"no {TOKEN_BYTES_FILE} or token_bytes.pt in {path_or_dir}")
    if path.endswith(".pt"):
        return torch.load(path, map_location="cpu", weights_only=True).to(torch.int32)
    return load_file(path)["token_bytes"]


def load_legacy_pickle(path: str, allow_pickle: bool = False) -> "CognicaPoETokenizer":
    """nanochat's tokenizer.pkl. Unpickling can run arbitrary code, so it needs an explicit opt-in."""
    if not allow_pickle:
        raise ValueError(
            f"{path} is a pickle (nanochat's tokenizer.pkl): loading it can run arbitrary code. Only if you trust "
            "the file, opt in with allow_pickle=True (CLI: --allow-pickle); `cognica-poe convert` then saves it "
            "once in the safe format (tokenizer.tiktoken) and the pickle is never needed again.")
    import pickle  # only reached on explicit opt-in

    with open(path, "rb") as f:
        encoding = pickle.load(f)
    if not isinstance(encoding, tiktoken.Encoding):
        raise ValueError(f"{path} does not hold a tiktoken.Encoding (got {type(encoding).__name__})")
    return CognicaPoETokenizer.from_encoding(encoding)


def tokenizer_auto_map() -> list:
    """tokenizer_config.json's auto_map entry: transformers reads it as [slow class, fast class]."""
    return ["tokenizer.CognicaPoETokenizer", None]


# -----------------------------------------------------------------------------
# the transformers tokenizer

class CognicaPoETokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": VOCAB_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str | None = None, pat_str: str = SPLIT_PATTERN, add_bos_token: bool = False,
                 encoding: tiktoken.Encoding | None = None, bos_token: str = "<|bos|>",
                 eos_token: str = "<|assistant_end|>", pad_token: str = "<|bos|>", padding_side: str = "left",
                 **kwargs):
        if encoding is None:
            if vocab_file is None or not os.path.isfile(vocab_file):
                raise FileNotFoundError(f"tokenizer vocabulary {VOCAB_FILE} not found (looked for {vocab_file!r})")
            encoding = build_encoding(read_ranks(vocab_file), pat_str)
        self.encoding = encoding
        self.add_bos_token = add_bos_token
        self._special_ids = {name: encoding.encode_single_token(name) for name in SPECIAL_TOKENS}
        self._id_to_str = []
        for i in range(encoding.n_vocab):
            b = encoding.decode_single_token_bytes(i)
            s = b.decode("latin-1")
            self._id_to_str.append(s if s in self._special_ids else "".join(BYTE_ENCODER[x] for x in b))
        self._str_to_id = {s: i for i, s in enumerate(self._id_to_str)}
        self._added_tokens_decoder = {i: AddedToken(name, special=True, normalized=False)
                                      for name, i in self._special_ids.items()}
        kwargs.pop("added_tokens_decoder", None)
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, padding_side=padding_side,
                         pat_str=encoding._pat_str, add_bos_token=add_bos_token,
                         special_tokens_pattern="bos" if add_bos_token else "none", **kwargs)

    @classmethod
    def from_encoding(cls, encoding: tiktoken.Encoding, **kwargs) -> "CognicaPoETokenizer":
        """Wrap an existing tiktoken Encoding (e.g. a freshly trained one, or a legacy pickle)."""
        missing = [t for t in SPECIAL_TOKENS if t not in encoding.special_tokens_set]
        if missing:
            raise ValueError(f"encoding lacks the special tokens {missing}")
        return cls(encoding=encoding, pat_str=encoding._pat_str, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def __len__(self) -> int:
        return self.encoding.n_vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self._str_to_id)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._id_to_str[i] for i in self.encoding.encode_ordinary(text)]

    def _convert_token_to_id(self, token: str) -> int:
        if token not in self._str_to_id:
            raise KeyError(f"unknown token {token!r}")
        return self._str_to_id[token]

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_str[index]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        out = bytearray()
        for t in tokens:
            out += t.encode() if t in self._special_ids else bytes(BYTE_DECODER[c] for c in t)
        return out.decode("utf-8", errors="replace")

    def _decode(self, token_ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        if skip_special_tokens:
            special = set(self._special_ids.values())
            ids = [i for i in ids if i not in special]
        return self.encoding.decode(ids, errors="replace")

    def build_inputs_with_special_tokens(self, token_ids_0: list[int], token_ids_1: list[int] | None = None
                                         ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        out = bos + list(token_ids_0)
        if token_ids_1 is not None:
            out += bos + list(token_ids_1)
        return out

    def add_bos(self, ids: list[int] | list[list[int]]) -> list[int] | list[list[int]]:
        """Prepend BOS to a list of ids (or to each list in a list) where it is missing."""
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.add_bos(row) for row in ids]
        ids = list(ids)
        return ids if ids[:1] == [self.bos_token_id] else [self.bos_token_id] + ids

    def token_bytes(self) -> torch.Tensor:
        """int32 (vocab,): byte length of every id, 0 for specials (bits-per-byte denominators)."""
        if not hasattr(self, "_token_bytes"):
            self._token_bytes = token_bytes_of(self.encoding)
        return self._token_bytes

    def render_conversation(self, messages: list[dict], max_tokens: int | None = None
                            ) -> tuple[list[int], list[int]]:
        """
        nanochat's chat rendering: (ids, mask) with mask 1 exactly on assistant content and <|assistant_end|>.
        A leading system message is merged into the first user turn; roles must then alternate user/assistant.
        """
        messages = list(messages)
        if messages and messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise ValueError("a system message must be followed by a user message")
            messages = [{"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}] \
                + messages[2:]
        ids, mask = [self.bos_token_id], [0]
        s = self._special_ids
        for i, m in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise ValueError(f"message {i} has role {m['role']!r}; expected {expected!r} "
                                 "(roles alternate user/assistant after an optional system message)")
            body = self.encoding.encode_ordinary(m["content"])
            if expected == "user":
                ids += [s["<|user_start|>"], *body, s["<|user_end|>"]]
                mask += [0] * (len(body) + 2)
            else:
                ids += [s["<|assistant_start|>"], *body, s["<|assistant_end|>"]]
                mask += [0] + [1] * (len(body) + 1)
        if max_tokens is not None:
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        vocab_path = os.path.join(save_directory, prefix + VOCAB_FILE)
        bytes_path = os.path.join(save_directory, prefix + TOKEN_BYTES_FILE)
        write_ranks(vocab_path, self.encoding._mergeable_ranks)
        save_file({"token_bytes": self.token_bytes().contiguous()}, bytes_path)
        return (vocab_path, bytes_path)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save, then the remote-code auto_map in tokenizer_config.json."""
        files = super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "tokenizer_config.json")
        with open(path) as f:
            config = json.load(f)
        config["auto_map"] = {"AutoTokenizer": tokenizer_auto_map()}
        config["add_bos_token"] = self.add_bos_token  # transformers' base class does not persist it for us
        with open(path, "w") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")
        return files
