"""
What every decoding mode shares: the sampling parameters (checked once, here), request checks, logits
processors, token choice, stop tokens, streaming and the output tensor.

Token choice follows transformers' order: logits processors (repetition penalty, no-repeat n-grams, the
caller's own LogitsProcessors), then, when sampling, temperature, top-k, top-p (nucleus) and min-p on the
processed scores; greedy is argmax. A seeded `torch.Generator` makes sampling reproducible. Each mode
(prefix.py, compose.py, wand.py, speculative.py) supplies only how it computes the next-token scores; `decode`
runs the one-token-per-step loop for the modes that emit one token per row per step.

Processors see each row's own tokens so far (its prompt without the left padding, then what it generated), so a
padded row decodes as it would alone, as transformers' generate() does for the repetition penalty.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)
from transformers.generation.streamers import BaseStreamer

from .cache import CognicaKVCache
from .config import is_int
from .model import GPT

Streamer = Callable[[int, int], None] | BaseStreamer


def is_real(value) -> bool:
    """A real number of any kind (Python, numpy) that is not a bool; NaN and inf included."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def token_list(value, name: str) -> list[int]:
    """One token id or a sequence of them (Python or numpy integers, or an integer tensor) as a list of ints."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool or value.dim() > 1:
            raise ValueError(f"{name} must be token ids (integers), got a {value.dtype} tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.tolist()
    items = [value] if is_int(value) else value
    if isinstance(items, (str, bytes)) or not isinstance(items, (list, tuple, set, frozenset)) \
            or not all(is_int(t) for t in items):
        raise ValueError(f"{name} must be a token id or a list of token ids (integers), got {value!r}")
    if any(t < 0 for t in items):
        raise ValueError(f"{name} must be non-negative token ids, got {value!r}")
    return [int(t) for t in items]


# -----------------------------------------------------------------------------
# the parameters every mode takes

# generation_config fields the modes apply, and those that change nothing here
CONFIG_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "no_repeat_ngram_size")
CONFIG_IGNORED = ("transformers_version", "bos_token_id", "pad_token_id", "use_cache", "_from_model_config")


@dataclass
class SamplingParams:
    """
    How a mode picks each token and when it stops: the keyword arguments every decoding mode takes. All of them
    are checked here, once, so a bad value fails before any work with a ValueError that names the argument.
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None  # 0 or None: off
    top_p: float | None = None  # in (0, 1]; 1 or None: off
    min_p: float | None = None  # in [0, 1], relative to the top token's probability (sampling only)
    repetition_penalty: float | None = None  # > 0; 1 or None: off
    no_repeat_ngram_size: int | None = None  # 0 or None: off
    logits_processor: list | None = None  # transformers LogitsProcessors, applied after the two above
    seed: int | None = None
    stop_tokens: list[int] | int | None = None  # None: the config's eos ids; [] never stops early
    streamer: Streamer | None = None  # a transformers streamer (batch 1) or a callback streamer(row, token)
    max_length: int | None = None  # the context limit (default sequence_len, up to the rotary table)

    def __post_init__(self):
        def fail(name: str, rule: str):
            raise ValueError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            fail("max_new_tokens", "a positive integer")
        if not isinstance(self.do_sample, bool):
            fail("do_sample", "True or False")
        if not is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            fail("temperature", "a finite number >= 0")
        if self.do_sample and self.temperature == 0:
            fail("temperature", "> 0 when sampling (do_sample=False is greedy)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            fail("top_k", "an integer >= 0 (0 or None: off)")
        if self.top_p is not None and (not is_real(self.top_p) or not 0 < self.top_p <= 1):
            fail("top_p", "a number in (0, 1]")
        if self.min_p is not None and (not is_real(self.min_p) or not 0 <= self.min_p <= 1):
            fail("min_p", "a number in [0, 1]")
        if self.repetition_penalty is not None and (not is_real(self.repetition_penalty)
                                                    or not 0 < self.repetition_penalty < math.inf):
            fail("repetition_penalty", "a finite number > 0 (1 or None: off)")
        if self.no_repeat_ngram_size is not None and (not is_int(self.no_repeat_ngram_size)
                                                      or self.no_repeat_ngram_size < 0):
            fail("no_repeat_ngram_size", "an integer >= 0 (0 or None: off)")
        if self.logits_processor is not None and (not isinstance(self.logits_processor, (list, tuple))
                                                  or not all(callable(p) for p in self.logits_processor)):
            fail("logits_processor", "a list of transformers LogitsProcessors (callables (input_ids, scores))")
        if self.seed is not None and not is_int(self.seed):
            fail("seed", "an integer or None")
        if self.streamer is not None and not (isinstance(self.streamer, BaseStreamer) or callable(self.streamer)):
            fail("streamer", "a transformers streamer or a callable streamer(row, token)")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 1):
            fail("max_length", "a positive integer or None")
        if self.stop_tokens is not None:
            self.stop_tokens = token_list(self.stop_tokens, "stop_tokens")
        # numpy scalars become Python numbers: they flow into error messages and torch calls
        for name in ("max_new_tokens", "top_k", "no_repeat_ngram_size", "seed", "max_length"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            if getattr(self, name) is not None:
                setattr(self, name, float(getattr(self, name)))

    @classmethod
    def from_kwargs(cls, generation_config: GenerationConfig | None = None, **kwargs) -> "SamplingParams":
        """
        The parameters from a mode's keyword arguments; a transformers GenerationConfig fills those not passed
        (its eos_token_id becomes stop_tokens). Fields of it the modes cannot honour are an error, not ignored.
        """
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}: the decoding modes take {names} and "
                            "generation_config")
        if generation_config is not None:
            if not isinstance(generation_config, GenerationConfig):
                raise ValueError(f"generation_config must be a transformers GenerationConfig, got "
                                 f"{type(generation_config).__name__}")
            given = {k: v for k, v in generation_config.to_diff_dict().items() if v is not None}
            unsupported = sorted(set(given) - set(CONFIG_FIELDS) - set(CONFIG_IGNORED) - {"eos_token_id"})
            if unsupported:
                raise ValueError(f"generation_config sets {unsupported}, which the PoE decoding modes do not support "
                                 f"(they apply {list(CONFIG_FIELDS)} and eos_token_id)")
            if "eos_token_id" in given:
                kwargs.setdefault("stop_tokens", given["eos_token_id"])
            for name in CONFIG_FIELDS:
                if name in given:
                    kwargs.setdefault(name, given[name])
        return cls(**kwargs)

    def processors(self) -> LogitsProcessorList:
        """The logits processors, in generate()'s order, built with transformers' own classes."""
        out = LogitsProcessorList()
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.no_repeat_ngram_size:
            out.append(NoRepeatNGramLogitsProcessor(self.no_repeat_ngram_size))
        out.extend(self.logits_processor or [])
        return out


# -----------------------------------------------------------------------------
# the request: token ids, attention mask, context length


def check_request(gpt: GPT, input_ids, attention_mask, params: SamplingParams
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """
    Validate token ids and mask against the model; returns (input_ids (B, T) long on the model's device,
    attention_mask or None when every token is real). Only left padding is accepted: right padding would put
    pads between a prompt and its continuation.
    """
    try:
        input_ids = torch.as_tensor(input_ids)
    except (ValueError, TypeError, RuntimeError) as e:
        raise ValueError(f"input_ids must be a (batch, length) array of token ids with rows of equal length "
                         f"(left-pad shorter prompts and pass attention_mask): {e}") from None
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.long()
    cfg = gpt.config
    bad = (input_ids < 0) | (input_ids >= cfg.vocab_size)
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        raise ValueError(f"token id {int(input_ids[row, col])} (row {row}, position {col}) is outside the "
                         f"vocabulary 0..{cfg.vocab_size - 1}")
    out_of_vocab = [t for t in params.stop_tokens or [] if t >= cfg.vocab_size]
    if out_of_vocab:
        raise ValueError(f"stop_tokens {out_of_vocab} are outside the vocabulary 0..{cfg.vocab_size - 1}")
    limit = params.max_length if params.max_length is not None else cfg.sequence_len
    if limit > cfg.rotary_seq_len:
        raise ValueError(f"max_length {limit} exceeds {cfg.rotary_multiplier} x sequence_len "
                         f"({cfg.rotary_seq_len}), the rotary table's reach")
    if input_ids.size(1) + params.max_new_tokens > limit:
        raise ValueError(f"prompt ({input_ids.size(1)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
                         f"context of {limit} tokens (sequence_len {cfg.sequence_len}; pass max_length= (the CLI's "
                         f"--max-length) to raise it, up to {cfg.rotary_multiplier}x)")
    device = gpt.device
    input_ids = input_ids.to(device)
    if attention_mask is not None:
        attention_mask = check_mask(attention_mask, input_ids).to(device)
        if bool(attention_mask.all()):
            attention_mask = None
    warn_if_missing_bos(input_ids, attention_mask, cfg.bos_token_id)
    return input_ids, attention_mask


def check_mask(attention_mask, input_ids: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask of input_ids' shape, every row's real tokens after its pads (left padding): as a long tensor."""
    mask = torch.as_tensor(attention_mask)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (pad) and 1 (real token)")
    mask = mask.long()
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"attention_mask row {int((~mask.bool().any(dim=1)).nonzero()[0])} has no real token")
    gap = mask[:, 1:] < mask[:, :-1]  # a pad after a real token
    if bool(gap.any()):
        row = int(gap.any(dim=1).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has padding after its tokens; the decoding modes need left "
                         "padding (tokenizer.padding_side = 'left'), so that every row continues from its end")
    return mask


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


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


# -----------------------------------------------------------------------------
# token choice


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """Scores (B, V) -> temperature-scaled scores with -inf outside the top-k / nucleus / min-p set."""
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
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None) -> torch.Tensor:
    """The distribution a sampler draws from (B, V), in fp32."""
    return process_logits(logits, temperature, top_k, top_p, min_p).softmax(dim=-1)


def choose_tokens(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  min_p: float | None = None) -> torch.Tensor:
    """Next token per row (B,): argmax, or a draw from the processed distribution."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# -----------------------------------------------------------------------------
# the generated tokens


class TokenSink:
    """Collects each row's generated tokens, applies stop tokens and the budget, streams as tokens arrive."""

    def __init__(self, batch_size: int, max_new_tokens: int, stop_tokens: list[int] | int | None,
                 streamer: Streamer | None = None, pad_id: int = 0):
        if isinstance(stop_tokens, int):
            stop_tokens = [stop_tokens]
        self.stop = set(stop_tokens or [])
        self.pad_id = pad_id
        self.max_new = max_new_tokens
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size
        self.streamer = streamer

    def push(self, row: int, tokens: list[int]) -> int:
        """Append tokens to a row until it stops; returns how many it took."""
        taken = 0
        for t in tokens:
            if self.done[row]:
                break
            self.rows[row].append(int(t))
            taken += 1
            if isinstance(self.streamer, BaseStreamer):
                self.streamer.put(torch.tensor([int(t)]))
            elif self.streamer is not None:
                self.streamer(row, int(t))
            if int(t) in self.stop or len(self.rows[row]) >= self.max_new:
                self.done[row] = True
        return taken

    def push_column(self, tokens: torch.Tensor) -> None:
        for row, t in enumerate(tokens.tolist()):
            self.push(row, [t])

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def output(self, input_ids: torch.Tensor) -> torch.Tensor:
        """
        (B, T + longest) prompt + generated tokens, rows shorter than the longest padded with pad_id. Generation is
        over: a transformers streamer is told so.
        """
        if isinstance(self.streamer, BaseStreamer):
            self.streamer.end()
        n = max(len(r) for r in self.rows)
        out = torch.full((len(self.rows), n), self.pad_id, dtype=torch.long, device=input_ids.device)
        for i, r in enumerate(self.rows):
            if r:
                out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        return torch.cat([input_ids, out], dim=1)


# -----------------------------------------------------------------------------
# the decode loop


@dataclass
class DecodeState:
    """Everything a decode loop carries: the checked request, its cache and generator, processors and tokens."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None
    params: SamplingParams
    cache: CognicaKVCache
    generator: torch.Generator | None
    processors: LogitsProcessorList
    prompts: list[list[int]]  # each row's real prompt tokens (no left padding)
    sink: TokenSink

    def process(self, scores: torch.Tensor, drafts: list[torch.Tensor] = ()) -> torch.Tensor:
        """
        The logits processors applied to next-token scores (B, V), each row with its own tokens so far: prompt,
        generated tokens, then drafts (each (B,)) not yet emitted. Rows of equal length share one call.
        """
        if not self.processors:
            return scores
        extra = torch.stack(list(drafts), dim=1).tolist() if len(drafts) else [[] for _ in self.prompts]
        seqs = [p + r + d for p, r, d in zip(self.prompts, self.sink.rows, extra)]
        device = scores.device
        if len({len(s) for s in seqs}) == 1:
            return self.processors(torch.tensor(seqs, dtype=torch.long, device=device), scores)
        return torch.cat([self.processors(torch.tensor([s], dtype=torch.long, device=device), scores[i:i + 1])
                          for i, s in enumerate(seqs)])

    def probs(self, scores: torch.Tensor) -> torch.Tensor:
        """The distribution sampling draws from, after temperature / top-k / top-p / min-p."""
        p = self.params
        return sampling_probs(scores, p.temperature, p.top_k, p.top_p, p.min_p)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Next token per row (B,) from processed scores."""
        p = self.params
        return choose_tokens(scores, p.do_sample, p.temperature, p.top_k, p.top_p, self.generator, p.min_p)

    def output(self) -> torch.Tensor:
        return self.sink.output(self.input_ids)


def begin_decoding(gpt: GPT, input_ids, attention_mask, params: SamplingParams, extra_slots: int = 0,
                   keep_hidden: bool = False) -> DecodeState:
    """
    Everything a decode loop starts from: the checked request, an empty cache of prompt + max_new_tokens +
    extra_slots slots (at most the rotary table's), the seeded generator, the processors and the token sink
    (stop tokens default to the config's eos ids). A transformers streamer receives the prompt here, as
    generate() sends it.
    """
    input_ids, attention_mask = check_request(gpt, input_ids, attention_mask, params)
    B, T = input_ids.shape
    if isinstance(params.streamer, BaseStreamer) and B > 1:
        raise ValueError(f"a transformers streamer follows one sequence, got a batch of {B}: decode one row, or "
                         "pass streamer=callable(row, token)")
    cfg = gpt.config
    cache_len = min(T + params.max_new_tokens + extra_slots, cfg.rotary_seq_len)
    cache = gpt.new_cache(B, cache_len, keep_hidden=keep_hidden)
    stop_tokens = params.stop_tokens
    if stop_tokens is None:
        eos = cfg.eos_token_id
        stop_tokens = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    sink = TokenSink(B, params.max_new_tokens, stop_tokens, params.streamer, pad)
    real = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    prompts = [row[keep].tolist() for row, keep in zip(input_ids, real)]
    if isinstance(params.streamer, BaseStreamer):
        params.streamer.put(torch.tensor(prompts))
    return DecodeState(input_ids, attention_mask, params, cache, make_generator(params.seed, input_ids.device),
                       params.processors(), prompts, sink)


def decode(gpt: GPT, input_ids, attention_mask: torch.Tensor | None, params: SamplingParams,
           next_scores: Callable[[CognicaKVCache, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
    """
    The one-token-per-step loop. next_scores(cache, new_ids (B, T), attention_mask) runs the mode's forward for
    the new tokens (the prompt first, then one token per row) and returns the next-token scores (B, V).
    Returns prompt + generated ids (B, T + n).
    """
    state = begin_decoding(gpt, input_ids, attention_mask, params)
    scores = next_scores(state.cache, state.input_ids, state.attention_mask)
    while True:
        tokens = state.choose(state.process(scores))
        state.sink.push_column(tokens)
        if state.sink.all_done:
            break
        scores = next_scores(state.cache, tokens[:, None], None)
    return state.output()
