"""
What every decoding mode shares: request checks, token choice, stop tokens, streaming and the output tensor.

Token choice follows transformers' order: temperature, then top-k, then top-p (nucleus) on the scaled
logits; greedy is argmax. A seeded `torch.Generator` makes sampling reproducible. Each mode (stage.py,
compose.py, wand.py, speculative.py) supplies only how it computes the next-token scores; `decode` runs the
one-token-per-step loop for the modes that emit one token per row per step.

This file is copied into exported remote-code folders: it imports only torch and siblings.
"""

import warnings
from collections.abc import Callable

import torch

from .cache import CognicaKVCache

MAX_CONTEXT_MULTIPLIER = 10  # rotary tables are built for 10 x sequence_len


def first_real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The first non-pad token of every row (B,)."""
    if attention_mask is None:
        return input_ids[:, 0]
    first = attention_mask.to(torch.long).argmax(dim=1)
    return input_ids.gather(1, first[:, None])[:, 0]


def warn_if_missing_bos(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, bos_token_id: int | None) -> None:
    """Every document was trained to start with <|bos|>; without it the base model degenerates into repetition."""
    if bos_token_id is None or input_ids.numel() == 0:
        return
    first = first_real_tokens(input_ids, attention_mask)
    if bool((first != bos_token_id).any()):
        warnings.warn(f"prompt does not start with the BOS token (id {bos_token_id}); the model was trained on "
                      "BOS-prefixed documents and degrades without it: prepend tokenizer.bos_token_id "
                      "(or use tokenizer.add_bos / add_bos_token=True)", UserWarning, stacklevel=3)


def check_request(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                  max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a generation request; returns (input_ids (B, T), attention_mask or None when all real)."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    cfg = model.config
    if int(input_ids.max()) >= cfg.vocab_size or int(input_ids.min()) < 0:
        raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}")
    limit = max_length if max_length is not None else cfg.sequence_len
    if limit > MAX_CONTEXT_MULTIPLIER * cfg.sequence_len:
        raise ValueError(f"max_length {limit} exceeds {MAX_CONTEXT_MULTIPLIER} x sequence_len "
                         f"({MAX_CONTEXT_MULTIPLIER * cfg.sequence_len}), the rotary table's reach")
    if input_ids.size(1) + max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.size(1)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"context of {limit} tokens (sequence_len {cfg.sequence_len}; pass max_length= (the CLI's "
                         f"--max-length) to raise it, up to {MAX_CONTEXT_MULTIPLIER}x)")
    device = model.gpt.lm_head.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        attention_mask = attention_mask.to(device)
        if bool(attention_mask.all()):
            attention_mask = None
    warn_if_missing_bos(input_ids, attention_mask, cfg.bos_token_id)
    return input_ids, attention_mask


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """Scores (B, V) -> temperature-scaled scores with -inf outside the top-k / nucleus."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    scores = logits.float() / temperature
    if top_k is not None and 0 < top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_scores.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """The distribution a sampler draws from (B, V), in fp32."""
    return process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)


def choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row (B,): argmax, or a draw from the processed distribution."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class TokenSink:
    """Collects each row's generated tokens, applies stop tokens and the budget, streams as tokens arrive."""

    def __init__(self, batch_size: int, max_new_tokens: int, stop_tokens: list[int] | int | None,
                 streamer: Callable[[int, int], None] | None = None, pad_id: int = 0):
        if isinstance(stop_tokens, int):
            stop_tokens = [stop_tokens]
        self.stop = set(stop_tokens or [])
        self.pad_id = pad_id
        self.max_new = max_new_tokens
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.streamer = streamer

    def push(self, row: int, tokens: list[int]) -> None:
        for t in tokens:
            if self.done[row]:
                return
            self.rows[row].append(int(t))
            if self.streamer is not None:
                self.streamer(row, int(t))
            if int(t) in self.stop or len(self.rows[row]) >= self.max_new:
                self.done[row] = True

    def push_column(self, tokens: torch.Tensor) -> None:
        for row, t in enumerate(tokens.tolist()):
            self.push(row, [t])

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def output(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T + longest) prompt + generated tokens, rows shorter than the longest padded with pad_id."""
        n = max(len(r) for r in self.rows)
        out = torch.full((len(self.rows), n), self.pad_id, dtype=torch.long, device=input_ids.device)
        for i, r in enumerate(self.rows):
            if r:
                out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return torch.cat([input_ids, out], dim=1)


def begin_decoding(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                   max_length: int | None, stop_tokens: list[int] | int | None,
                   streamer: Callable[[int, int], None] | None, seed: int | None, cache_len: int | None = None,
                   keep_hidden: bool = False):
    """
    Everything a decode loop starts from: the checked (input_ids, attention_mask), an empty cache of cache_len
    slots (default prompt + max_new_tokens), the seeded generator and the token sink (stop tokens default to
    the config's eos ids).
    """
    input_ids, attention_mask = check_request(model, input_ids, attention_mask, max_new_tokens, max_length)
    B, T = input_ids.shape
    cache = model.new_cache(B, cache_len or T + max_new_tokens, keep_hidden=keep_hidden)
    if stop_tokens is None:
        eos = model.config.eos_token_id
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    sink = TokenSink(B, max_new_tokens, stop_tokens, streamer, pad)
    return input_ids, attention_mask, cache, make_generator(seed, input_ids.device), sink


def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
           next_scores: Callable[[CognicaKVCache, torch.Tensor, torch.Tensor | None], torch.Tensor],
           do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, stop_tokens: list[int] | int | None = None,
           streamer: Callable[[int, int], None] | None = None, max_length: int | None = None) -> torch.Tensor:
    """
    The one-token-per-step loop. next_scores(cache, new_ids (B, T), attention_mask) runs the mode's forward for
    the new tokens (the prompt first, then one token per row) and returns the next-token scores (B, V).
    Returns prompt + generated ids (B, T + n).
    """
    input_ids, attention_mask, cache, generator, sink = begin_decoding(
        model, input_ids, attention_mask, max_new_tokens, max_length, stop_tokens, streamer, seed)
    scores = next_scores(cache, input_ids, attention_mask)
    while True:
        tokens = choose_tokens(scores, do_sample, temperature, top_k, top_p, generator)
        sink.push_column(tokens)
        if sink.all_done:
            break
        scores = next_scores(cache, tokens[:, None], None)
    return sink.output(input_ids)
