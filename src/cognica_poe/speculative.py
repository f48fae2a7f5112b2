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

Rows advance at their own pace: a row that accepts fewer drafts marks its unused slots invalid in the shared
cache (no copy); positions, masks and smear skip them. Rejected work is cropped from every layer.

This file is copied into exported remote-code folders: it imports only torch and siblings.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import CognicaKVCache
from .sampling import begin_decoding, choose_tokens, sampling_probs


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
def run_speculative(model, input_ids: torch.Tensor, max_new_tokens: int = 32, draft_stage: int = 0, k_draft: int = 3,
                    do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, seed: int | None = None, stop_tokens: list[int] | int | None = None,
                    attention_mask: torch.Tensor | None = None, streamer: Callable[[int, int], None] | None = None,
                    max_length: int | None = None) -> SpeculativeResult:
    """
    Speculative decoding with its statistics. Afterwards every layer of the cache holds every kept slot (the
    newest token, like in plain decoding, is not forwarded yet).
    """
    if isinstance(k_draft, bool) or not isinstance(k_draft, int) or k_draft < 1:
        raise ValueError(f"k_draft must be an integer >= 1, got {k_draft!r}")
    n_stages = model.poe_n_stages
    draft_boundary = model.stage_boundary(draft_stage)
    if draft_stage % n_stages == n_stages - 1:
        raise ValueError(f"draft_stage {draft_stage} is the last stage: the drafter must be an earlier exit "
                         f"(0..{n_stages - 2})")
    input_ids = torch.as_tensor(input_ids)
    B, T = input_ids.shape if input_ids.dim() == 2 else (1, len(input_ids))
    # one row never leaves holes; rows of a batch may each waste up to k slots per iteration
    max_len = T + max_new_tokens + k_draft + 1 if B == 1 else T + (max_new_tokens + 1) * (k_draft + 1)
    input_ids, attention_mask, cache, generator, sink = begin_decoding(
        model, input_ids, attention_mask, max_new_tokens, max_length, stop_tokens, streamer, seed, max_len,
        keep_hidden=True)
    gpt = model.gpt
    last = model.config.n_layer - 1

    def probs(logits):
        return sampling_probs(logits, temperature, top_k, top_p) if do_sample else logits

    seconds = dict.fromkeys(("prefill", "draft", "verify", "accept"), 0.0)
    clock = time.perf_counter()

    def lap(phase):  # attribute the time since the last lap to `phase`
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] += now - clock
        clock = now

    full = gpt.exit_logits(gpt.hidden_at_exits(input_ids, [last], cache, attention_mask, logits_to_keep=1)[last],
                           last)
    token = choose_tokens(full[:, -1], do_sample, temperature, top_k, top_p, generator)  # (B,) not yet forwarded
    sink.push_column(token)
    lap("prefill")
    accepted = drafted = iterations = draft_steps = 0
    while not sink.all_done:
        n = cache.n_slots  # `token` takes slot n
        active = torch.tensor([not d for d in sink.done], device=input_ids.device)
        drafts, q = [], []
        cur = token
        # never draft past the budget: the row needing the most tokens takes up to k drafts + the verifier's token
        k = max(1, min(k_draft, max(sink.max_new - len(r) for r, d in zip(sink.rows, sink.done) if not d) - 1))
        for _ in range(k):  # draft: the shallow layers only, one slot at a time
            slot, _ = cache.claim(cur[:, None])
            h = gpt.run_slots(cache, slot, slot + 1, 0, draft_boundary, [draft_boundary])[draft_boundary]
            logits = gpt.exit_logits(h, draft_boundary)[:, -1]
            cur = choose_tokens(logits, do_sample, temperature, top_k, top_p, generator)
            drafts.append(cur)
            q.append(probs(logits) if do_sample else None)
        lap("draft")
        # verify: the last draft's shallow layers, then the deep layers for all k + 1 slots from the kept stream
        slot, _ = cache.claim(cur[:, None])
        gpt.run_slots(cache, slot, slot + 1, 0, draft_boundary, [])
        h = gpt.run_slots(cache, n, slot + 1, draft_boundary + 1, last, [last])[last]
        p = probs(gpt.exit_logits(h, last))  # (B, k+1, V)
        lap("verify")
        drafts = torch.stack(drafts, dim=1)  # (B, k)
        n_acc, token = speculative_accept(p, torch.stack(q, dim=1) if do_sample else None, drafts, do_sample,
                                          generator)
        # roll back: row r keeps slots n .. n + n_acc[r]; the cache ends after the longest row
        new_len = n + 1 + int(n_acc.max())
        cache.crop(new_len)
        short = (n + 1 + n_acc) < new_len
        if bool(short.any()):
            rows = short.nonzero()[:, 0]
            cache.invalidate(rows, n + 1 + n_acc[rows], new_len)
        for row in range(B):
            if not sink.done[row]:
                sink.push(row, drafts[row, :int(n_acc[row])].tolist() + [int(token[row])])
        drafted += k * int(active.sum())
        accepted += int(n_acc[active].sum())
        iterations += 1
        draft_steps += k
        lap("accept")
    return SpeculativeResult(sink.output(input_ids), accepted, drafted, iterations, draft_steps, cache, seconds)


def generate_speculative(model, input_ids: torch.Tensor, max_new_tokens: int = 32, draft_stage: int = 0,
                         k_draft: int = 3, return_acceptance: bool = False, **kwargs):
    """Prompt + generated ids (B, T + n); with return_acceptance, (ids, accepted / drafted)."""
    r = run_speculative(model, input_ids, max_new_tokens=max_new_tokens, draft_stage=draft_stage, k_draft=k_draft,
                        **kwargs)
    return (r.sequences, r.acceptance) if return_acceptance else r.sequences
