"""
Self-speculative decoding: an early stage exit drafts, the full model verifies, nothing extra is trained.

Per iteration and row: the exit of `draft_stage` drafts k tokens autoregressively (running only the layers up
to its boundary; the cache keeps their keys/values and the stream at that boundary). One forward then
verifies all k + 1 positions: the newest draft runs the shallow layers (one position per row), and every
drafted position runs only the layers ABOVE the draft exit, starting from the kept stream (LayerSkip-style
reuse: the drafting work is never redone).

Acceptance. Greedy keeps the longest prefix of drafts equal to the full model's argmax, then the full model's
own next token: the output is token-for-token plain greedy. Sampling uses the standard rule (Leviathan et al.
2023; Chen et al. 2023): accept draft x with probability min(1, p(x) / q(x)), on the first rejection draw from
normalize(max(0, p - q)), after k acceptances draw a bonus token from p; p and q are the full and draft
distributions after the same temperature / top-k / top-p, so the output is distributed as the full model's.

Logits processors (repetition penalty, no-repeat n-grams, the caller's LogitsProcessors) apply to the draft
scores and to every verified position's scores, each with that position's prefix (the row's tokens, then the
drafts before it): greedy stays token-for-token plain greedy WITH the same processors, and sampling is
distributed as plain sampling with them.

Rows advance at their own pace: a row that accepts fewer drafts marks its unused slots invalid in the shared
cache (no copy); positions, masks and smear skip them. Rejected work is cropped from every layer. The cache
holds the prompt + max_new_tokens + k_draft + 1 slots, what one row can use; when the holes rows leave would
overflow it, it compacts (CognicaKVCache.compact), so a batch reaches the same context as a single row.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import time
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig

from .cache import CognicaKVCache
from .model import GPT
from .sampling import SamplingParams, begin_decoding, is_int


def speculative_accept(p: torch.Tensor, q: torch.Tensor | None, drafts: torch.Tensor, do_sample: bool,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """
    p (B, k+1, V): full-model scores (greedy) or probabilities (sampling) at the k+1 verified positions;
    q (B, k, V): draft probabilities (sampling only); drafts (B, k).
    Returns (accepted drafts per row (B,), the row's next token (B,)).
    """
    B, k = drafts.shape
    rows = torch.arange(B, device=drafts.device)
    if not do_sample:
        target = p.argmax(dim=-1)  # (B, k+1)
        match = (target[:, :k] == drafts).long()
        n_acc = match.cumprod(dim=1).sum(dim=1)
        return n_acc, target[rows, n_acc]
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k)
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(B, k, device=p.device, generator=generator)
    accept = (u * q_d < p_d).long()  # u < min(1, p/q), without dividing by a zero q
    n_acc = accept.cumprod(dim=1).sum(dim=1)
    # the next token: residual max(0, p - q) at the first rejection, else a bonus draw from p
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], dim=1)  # (B, k+1, V): no draft after the last position
    residual = (p[rows, n_acc] - q_pad[rows, n_acc]).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    dist = torch.where(mass > 0, residual / mass.clamp_min(1e-30), p[rows, n_acc])
    return n_acc, torch.multinomial(dist, 1, generator=generator)[:, 0]


@dataclass
class SpeculativeResult:
    sequences: torch.Tensor  # (B, T + n)
    accepted: int  # drafts accepted, summed over rows and iterations
    drafted: int  # drafts proposed
    iterations: int
    draft_steps: int  # drafting forwards (k per iteration, fewer when the budget ends sooner)
    cache: CognicaKVCache
    seconds: dict = field(default_factory=dict)  # wall time per phase: prefill, draft, verify, accept


    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@torch.no_grad()
def run_speculative(gpt: GPT, input_ids: torch.Tensor, draft_stage: int = 0, k_draft: int = 3,
                    attention_mask: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                    **sampling) -> SpeculativeResult:
    """
    Speculative decoding with its statistics. Afterwards every layer of the cache holds, for each row, its prompt
    and every generated token but the last (which, like in plain decoding, is not forwarded yet).
    """
    params = SamplingParams.from_kwargs(generation_config, **sampling)
    if not is_int(k_draft) or k_draft < 1:
        raise ValueError(f"k_draft must be an integer >= 1, got {k_draft!r}")
    k_draft = int(k_draft)
    n_stages = gpt.config.poe_n_stages
    draft_boundary = gpt.config.stage_boundary(draft_stage)
    if draft_boundary == gpt.config.poe_stage_boundary_layers[-1]:
        raise ValueError(f"draft_stage {draft_stage} is the last stage: the drafter must be an earlier exit "
                         f"(0..{n_stages - 2})")
    # the row needing the most slots holds its prompt, its tokens but the last, and one iteration's k + 1
    state = begin_decoding(gpt, input_ids, attention_mask, params, extra_slots=k_draft + 1, keep_hidden=True)
    cache, sink = state.cache, state.sink
    B = state.input_ids.size(0)
    device = state.input_ids.device
    last = gpt.config.n_layer - 1

    seconds = dict.fromkeys(("prefill", "draft", "verify", "accept"), 0.0)
    clock = time.perf_counter()

    def lap(phase):  # attribute the time since the last lap to `phase`
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] += now - clock
        clock = now

    full = gpt.exit_logits(gpt.hidden_at_exits(state.input_ids, [last], cache, state.attention_mask,
                                               logits_to_keep=1)[last], last)
    token = state.choose(state.process(full[:, -1]))  # (B,) not yet forwarded
    sink.push_column(token)
    lap("prefill")
    accepted = drafted = iterations = draft_steps = 0
    while not sink.all_done:
        active = torch.tensor([not d for d in sink.done], device=device)
        # never draft past the budget: the row needing the most tokens takes up to k drafts + the verifier's token
        k = max(1, min(k_draft, max(sink.max_new - len(r) for r, d in zip(sink.rows, sink.done) if not d) - 1))
        k = make_room(cache, k, ~active)
        n = cache.n_slots  # `token` takes slot n
        drafts, q = [], []
        cur = token
        for _ in range(k):  # draft: the shallow layers only, one slot at a time
            slot = cache.claim(cur[:, None])
            h = gpt.run_slots(cache, slot, slot + 1, 0, draft_boundary, [draft_boundary])[draft_boundary]
            scores = state.process(gpt.exit_logits(h, draft_boundary)[:, -1], drafts)
            cur = state.choose(scores)
            drafts.append(cur)
            q.append(state.probs(scores) if params.do_sample else None)
        lap("draft")
        # verify: the last draft's shallow layers, then the deep layers for all k + 1 slots from the kept stream
        slot = cache.claim(cur[:, None])
        gpt.run_slots(cache, slot, slot + 1, 0, draft_boundary, [draft_boundary])  # as a draft step (one graph)
        h = gpt.run_slots(cache, n, slot + 1, draft_boundary + 1, last, [last])[last]
        p = gpt.exit_logits(h, last)  # (B, k+1, V)
        if state.processors:  # each verified position with its own prefix
            p = torch.stack([state.process(p[:, j], drafts[:j]) for j in range(k + 1)], dim=1)
        drafts = torch.stack(drafts, dim=1)  # (B, k)
        if params.do_sample:
            p = state.probs(p.flatten(0, 1)).view(p.shape)
        lap("verify")
        n_acc, token = speculative_accept(p, torch.stack(q, dim=1) if params.do_sample else None, drafts,
                                          params.do_sample, state.generator)
        # each active row keeps `token`'s slot and the accepted drafts it took (a row that stops takes fewer);
        # finished rows keep nothing new. The cache ends after the longest row; shorter rows' slots become holes
        keep = [0] * B
        for row in range(B):
            if bool(active[row]):
                keep[row] = sink.push(row, drafts[row, :int(n_acc[row])].tolist() + [int(token[row])])
        ends = n + torch.tensor(keep, device=device)
        new_len = int(ends.max())
        cache.crop(new_len)
        short = ends < new_len
        if bool(short.any()):
            rows = short.nonzero()[:, 0]
            cache.invalidate(rows, ends[rows], new_len)
        drafted += k * int(active.sum())
        accepted += int(n_acc[active].sum())
        iterations += 1
        draft_steps += k
        lap("accept")
    return SpeculativeResult(state.output(), accepted, drafted, iterations, draft_steps, cache, seconds)


def make_room(cache: CognicaKVCache, k: int, finished: torch.Tensor) -> int:
    """
    The drafts (<= k) an iteration can claim with the verifier's token: when k + 1 slots do not fit after the
    longest row, the cache compacts (rows' holes squeezed out); only at the rotary table's very end do finished
    rows (B,) give up their slots too.
    """
    if cache.n_slots + k + 1 > cache.max_len:
        cache.compact()
        if cache.n_slots + 2 > cache.max_len and bool(finished.any()):
            rows = finished.nonzero()[:, 0]
            cache.invalidate(rows, torch.zeros_like(rows), cache.n_slots)
            cache.compact()
    return min(k, cache.max_len - cache.n_slots - 1)


def generate_speculative(gpt: GPT, input_ids: torch.Tensor, draft_stage: int = 0, k_draft: int = 3,
                         return_acceptance: bool = False, **kwargs):
    """
    Prompt + generated ids (B, T + n); with return_acceptance, (ids, accepted / drafted). kwargs: attention_mask,
    generation_config and the SamplingParams fields, as generate_stage.
    """
    r = run_speculative(gpt, input_ids, draft_stage=draft_stage, k_draft=k_draft, **kwargs)
    return (r.sequences, r.acceptance) if return_acceptance else r.sequences
