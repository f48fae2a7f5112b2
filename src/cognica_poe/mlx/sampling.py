"""
What every MLX decoding mode shares (one sequence at a time): request checks, token choice and the decode loop.

Token choice follows the PyTorch modes (../sampling.py): temperature, then top-k, then top-p on the scaled logits;
greedy is argmax. A seed makes sampling reproducible: every draw takes the next key split from mx.random.key(seed).
Stop tokens, the budget and streaming (a callback per token, `streamer(row, token)` with row 0) are the package's
TokenSink.
"""

import warnings
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ..sampling import TokenSink
from .model import Cache, Model


def check_request(model: Model, input_ids, max_new_tokens: int, max_length: int | None = None) -> list[int]:
    """Validate a generation request; returns the prompt as a list of ids."""
    ids = np.asarray(input_ids)
    if ids.ndim == 2:
        if ids.shape[0] != 1:
            raise ValueError(f"the MLX backend decodes one sequence at a time: input_ids has {ids.shape[0]} rows")
        ids = ids[0]
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty list of token ids, got shape {ids.shape} of {ids.dtype}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    cfg = model.config
    if int(ids.max()) >= cfg.vocab_size or int(ids.min()) < 0:
        raise ValueError(f"token ids must be in 0..{cfg.vocab_size - 1}")
    limit = max_length if max_length is not None else cfg.sequence_len
    if limit > cfg.rotary_seq_len:
        raise ValueError(f"max_length {limit} exceeds the rotary table's reach ({cfg.rotary_seq_len} positions)")
    if ids.size + max_new_tokens > limit:
        raise ValueError(f"prompt ({ids.size} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context of "
                         f"{limit} tokens (sequence_len {cfg.sequence_len}; pass max_length= (the CLI's "
                         f"--max-length) to raise it, up to {cfg.rotary_seq_len})")
    if cfg.bos_token_id is not None and int(ids[0]) != cfg.bos_token_id:
        warnings.warn(f"prompt does not start with the BOS token (id {cfg.bos_token_id}); the model was trained on "
                      "BOS-prefixed documents and degrades without it: prepend tokenizer.bos_token_id",
                      UserWarning, stacklevel=3)
    return [int(t) for t in ids]


def process_logits(logits: mx.array, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> mx.array:
    """Scores (V,) -> temperature-scaled scores with -inf outside the top-k / nucleus."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    scores = logits.astype(mx.float32) / temperature
    V = scores.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = mx.min(mx.topk(scores, top_k, axis=-1), axis=-1, keepdims=True)
        scores = mx.where(scores < kth, -mx.inf, scores)
    if top_p is not None and top_p < 1.0:
        order = mx.argsort(-scores, axis=-1)
        probs = mx.softmax(mx.take_along_axis(scores, order, axis=-1), axis=-1)
        drop_sorted = mx.cumsum(probs, axis=-1) - probs >= top_p  # keep the smallest set reaching top_p
        drop = mx.take_along_axis(drop_sorted, mx.argsort(order, axis=-1), axis=-1)
        scores = mx.where(drop, -mx.inf, scores)
    return scores


class Sampler:
    """Greedy or seeded sampling with fixed settings; every random draw advances the key."""

    def __init__(self, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None):
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k, top_p
        if do_sample:
            process_logits(mx.zeros((2,)), temperature)  # a bad temperature fails before any work
        self.key = mx.random.key(seed) if seed is not None else None

    def next_key(self) -> mx.array | None:
        if self.key is None:
            return None
        self.key, sub = mx.random.split(self.key)
        return sub

    def probs(self, logits: mx.array) -> mx.array:
        """The distribution a draw comes from (..., V), in fp32."""
        return mx.softmax(process_logits(logits, self.temperature, self.top_k, self.top_p), axis=-1)

    def draw(self, probs: mx.array) -> int:
        return int(mx.random.categorical(mx.log(probs), key=self.next_key()).item())

    def uniform(self) -> float:
        return float(mx.random.uniform(key=self.next_key()).item())

    def choose(self, logits: mx.array) -> int:
        """The next token from scores (V,): argmax, or a draw from the processed distribution."""
        if not self.do_sample:
            return int(mx.argmax(logits).item())
        scores = process_logits(logits, self.temperature, self.top_k, self.top_p)
        return int(mx.random.categorical(scores, key=self.next_key()).item())


def begin_decoding(model: Model, input_ids, max_new_tokens: int, max_length: int | None,
                   stop_tokens: list[int] | int | None, streamer: Callable[[int, int], None] | None,
                   keep_hidden: bool = False) -> tuple[list[int], Cache, TokenSink]:
    """The checked prompt, an empty cache and the token sink (stop tokens default to the config's eos ids)."""
    prompt = check_request(model, input_ids, max_new_tokens, max_length)
    if stop_tokens is None:
        eos = model.config.eos_token_id
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return prompt, model.new_cache(keep_hidden), TokenSink(1, max_new_tokens, stop_tokens, streamer)


def decode(model: Model, input_ids, max_new_tokens: int, next_scores: Callable[[Cache, mx.array], mx.array],
           sampler: Sampler, stop_tokens: list[int] | int | None = None,
           streamer: Callable[[int, int], None] | None = None, max_length: int | None = None) -> list[int]:
    """
    The one-token-per-step loop. next_scores(cache, new_ids (1, T)) runs the mode's forward for the new tokens
    (the prompt first, then one token at a time) and returns the next-token scores (V,). Returns prompt + new ids.
    """
    prompt, cache, sink = begin_decoding(model, input_ids, max_new_tokens, max_length, stop_tokens, streamer)
    scores = next_scores(cache, mx.array([prompt]))
    while True:
        token = sampler.choose(scores)
        sink.push(0, [token])
        if sink.all_done:
            return prompt + sink.rows[0]
        scores = next_scores(cache, mx.array([[token]]))
