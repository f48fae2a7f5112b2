"""
The continuous-batching engine behind `cognica-poe serve`: one thread steps every running row, admits new requests
between iterations and retires finished ones, so no request waits for another to finish. No web code here.

Rows and groups. A request becomes one row per choice (n per prompt). Rows decode in groups, each group one
CognicaKVCache whose batch dimension is its rows:

- "onepass": full, stage and compose rows (and sibling specialists' exits). All emit one token per row per step from
  the exits of ONE pass: a step runs the layers up to the deepest exit any row needs and each row reads its own exits.
- "wand": WAND rows (per-row thresholds; a stage runs while any row still needs it, skipped layers catch up later).
- "spec": speculative rows, one group per (draft_stage, k_draft): per-row drafts, verification and rollback.

Policy: every iteration runs prefill chunks (whole chunks of prefill_chunk tokens, oldest prompts first, until
prefill_chunk tokens have been forwarded) and then ONE step of every group, round robin, so every running row
advances once per iteration whatever its mode, and long prompts are prefilled a chunk at a time between the running
rows' steps.

Joining a running batch. A new row's prompt is prefilled in its own one-row cache; its first token is chosen from
the last chunk's exits. It then joins its group: its real slots are laid out right-aligned to end at the group's
last slot (pure left padding; a row's rotary positions are the count of its real tokens, so nothing about the row
changes) and appended to the group's batch. A newcomer longer than the group, or a group that fills up (speculative
rollbacks leave holes), is repacked: a new cache in which every row's real slots are copied in order and
right-aligned to end at the same slot. Joining and repacking make every layer's fill level the slot count: a layer
that a row never needs holds zeros in that row, which only that row's own (discarded) deeper activations ever read.
WAND groups first catch every layer up, so nothing is pending when rows join. Finished rows leave by a selection
along the batch: the others keep their slots.

A greedy row's tokens therefore do not depend on the rows around it: the same prompt chunks, the same exits, rows
that only ever differ by left padding.

Devices. A model placed by stages (placement.py) keeps each layer's keys on its layer's device, and sibling branches
placed on devices of their own (load_siblings' device_map) keep caches of their own there: every row copy or selection
indexes a buffer with indices on that buffer's device, a placed branch's cache takes the group cache's slot
bookkeeping again after every row operation (SiblingSpecialists.follow_rows), and the branches' logits come back to
the trunk's device, where every token is chosen.
"""

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .cache import CognicaKVCache
from .compose import log_op
from .sampling import choose_tokens, make_generator, process_logits
from .speculative import speculative_accept
from .wand import catch_up, exit_thresholds, resolve_bounds, top2_margin

MODES = ("full", "stage", "wand", "speculative", "compose")


class RequestError(ValueError):
    """A request the model cannot serve; `param` names the offending field (as OpenAI's error body does)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class QueueFull(RuntimeError):
    """The waiting queue is at its bound: the request is refused at once."""


@dataclass
class Decoding:
    """How a row chooses its tokens. temperature 0 is greedy; logprobs: alternatives per token (None: off)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None


@dataclass
class PoeSpec:
    """A resolved `poe` request field: the mode and what it needs, checked against the served model."""

    mode: str
    exits: list[int] = field(default_factory=list)  # onepass: flat exits read each step
    weights: list[float] | None = None  # compose: Log-OP weights
    thresholds: list[float] | None = None  # wand: the margin to exit after each stage
    draft_stage: int = 0
    k_draft: int = 3
    layers: int = 0  # onepass: layers a token needs (the deepest exit's depth)

    @property
    def kind(self) -> tuple:
        if self.mode == "wand":
            return ("wand",)
        if self.mode == "speculative":
            return ("spec", self.draft_stage, self.k_draft)
        return ("onepass",)


def slots_per_step(kind: tuple) -> int:
    """Cache slots one step of a group of this kind claims: a speculative step k drafts and one more, else one."""
    return kind[2] + 1 if kind[0] == "spec" else 1


@dataclass
class Event:
    """New tokens of one row (choice `index`), their logprobs, and when it ends, why and its PoE statistics."""

    index: int
    tokens: list[int]
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    finish: str | None = None  # "stop" | "length" | "timeout" | "cancelled" | "error"
    stats: dict | None = None  # the row's statistics so far


class Request:
    """A submitted request: prompts x n rows. emit(event) is called from the engine thread."""

    def __init__(self, prompts: list[list[int]], n: int, decoding: Decoding, poe: PoeSpec,
                 emit: Callable[[Event], None], timeout: float | None = None):
        self.prompts, self.n, self.decoding, self.poe, self.emit = prompts, n, decoding, poe, emit
        self.deadline = time.monotonic() + timeout if timeout else None
        self.cancelled = False
        self.stopped: set[int] = set()  # rows ended by their reader (a stop string was found)

    def cancel(self) -> None:
        """Stop generating every row (the client left): the rows are freed next iteration."""
        self.cancelled = True

    def stop_row(self, index: int) -> None:
        """Stop one row (its text reached a stop string): freed next iteration."""
        self.stopped.add(index)

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n


class Row:
    """One sequence being generated."""

    def __init__(self, request: Request, index: int, prompt_len: int, device: torch.device):
        self.request, self.index, self.prompt_len = request, index, prompt_len
        d = request.decoding
        self.generator = make_generator(None if d.seed is None else d.seed + index, device)
        self.tokens: list[int] = []
        self.pending: int | None = None  # chosen and emitted, not yet forwarded
        self.finish: str | None = None
        self.exit_counts: dict[int, int] = {}  # wand: exit stage histogram
        self.accepted = self.drafted = 0  # speculative
        self.layer_runs = 0  # layers run on this row's behalf, summed over its tokens
        self.decided = 0  # tokens chosen, a final stop token included

    @property
    def do_sample(self) -> bool:
        return self.request.decoding.temperature > 0

    @property
    def remaining(self) -> int:
        return self.request.decoding.max_tokens - len(self.tokens)

    def stats(self) -> dict:
        poe = self.request.poe
        out = {"mode": poe.mode, "layers_per_token": round(self.layer_runs / max(self.decided, 1), 3),
               "layer_runs": self.layer_runs, "tokens_decided": self.decided}
        if poe.mode == "wand":
            out["exit_stages"] = {str(k): v for k, v in sorted(self.exit_counts.items())}
        if poe.mode == "speculative":
            out.update(accepted=self.accepted, drafted=self.drafted, draft_stage=poe.draft_stage, k_draft=poe.k_draft)
        if poe.mode in ("stage", "compose", "full"):
            out["exits"] = list(poe.exits)
        return out


@dataclass
class Prefill:
    """A prompt being prefilled for its n rows: a chunk at a time in its own one-row cache, or (a prompt of one chunk)
    in one pass with other such prompts, as one row of their cache."""

    request: Request
    ids: list[int]
    rows: list[Row]
    cache: CognicaKVCache | None = None
    views: dict = field(default_factory=dict)
    row: int = 0  # the prompt's row in `cache`
    done: int = 0  # prompt tokens forwarded


@dataclass
class Group:
    kind: tuple
    rows: list[Row]
    cache: CognicaKVCache
    views: dict  # sibling branches' caches hanging off `cache` (onepass with siblings)


class Engine:
    """
    The serving engine: `submit` from any thread; one engine thread runs `iteration` in a loop. model is the base
    CognicaPoEForCausalLM; siblings (branches.SiblingSpecialists on that base) adds the branches' exits.
    """

    def __init__(self, model, siblings=None, max_batch: int = 16, max_queue: int = 64, prefill_chunk: int = 64,
                 room: int = 128):
        self.model = siblings.base if siblings is not None else model
        self.siblings = siblings
        self.gpt = self.model.gpt
        self.config = self.model.config
        self.device = self.gpt.device
        self.max_batch, self.max_queue, self.prefill_chunk, self.room = max_batch, max_queue, prefill_chunk, room
        self.cond = threading.Condition()
        self.waiting: deque[Request] = deque()
        self.prefilling: deque[Prefill] = deque()
        self.groups: dict[tuple, Group] = {}
        self.on_step: Callable[[str, int], None] | None = None  # (group kind, batch size) after every group step
        self.iterations = 0
        self.freed_rows = 0  # rows retired because their request was cancelled or timed out
        self._thread: threading.Thread | None = None
        self._stop = False

    # -----------------------------------------------------------------------------
    # the served model: exits and request resolution

    @property
    def n_base_exits(self) -> int:
        return self.model.poe_n_stages

    @property
    def n_exits(self) -> int:
        return self.siblings.n_exits if self.siblings is not None else self.n_base_exits

    def exit_depth(self, e: int) -> int:
        """Layers run to reach flat exit e."""
        if e < self.n_base_exits:
            return self.model.stage_boundary(e) + 1
        return self.siblings.branches[e - self.n_base_exits].config.n_layer

    def exit_of(self, stage, param: str) -> int:
        """A flat exit from a request (index or sibling name), or a RequestError naming `param`."""
        try:
            if self.siblings is not None:
                return self.siblings.exit_index(stage)
            if isinstance(stage, str):
                raise ValueError(f"no sibling named {stage!r}: this server has no --siblings")
            self.model.stage_boundary(stage)
            return stage % self.n_base_exits
        except ValueError as e:
            raise RequestError(param, str(e)) from None

    def resolve(self, model_exit: int | None, poe: dict | None) -> PoeSpec:
        """
        The `poe` field of a request for the model id whose own exit is `model_exit` (None: the base). full is that
        model's last exit; stage / compose name flat exits (the base's 0..n-1, then the siblings').
        """
        poe = dict(poe or {})
        mode = poe.get("mode") or "full"
        if mode not in MODES:
            raise RequestError("poe.mode", f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        own = self.n_base_exits - 1 if model_exit is None else model_exit
        on_branch = own >= self.n_base_exits
        if mode == "full":
            return PoeSpec("full", [own], layers=self.exit_depth(own))
        if mode == "stage":
            if poe.get("stage") is None:
                raise RequestError("poe.stage", "mode stage needs poe.stage (a 0-based exit)")
            e = self.exit_of(poe["stage"], "poe.stage")
            return PoeSpec("stage", [e], layers=self.exit_depth(e))
        if mode == "compose":
            stages = poe.get("stages")
            if stages is None:
                stages = list(range(self.n_base_exits)) + ([own] if on_branch else [])
            if not stages:
                raise RequestError("poe.stages", "poe.stages must name at least one exit")
            exits = [self.exit_of(s, "poe.stages") for s in stages]
            weights = poe.get("stage_weights")
            if weights is None:
                weights = [1.0] * len(exits)
            if len(weights) != len(exits):
                raise RequestError("poe.stage_weights", f"poe.stage_weights has {len(weights)} entries but "
                                                        f"poe.stages has {len(exits)}")
            return PoeSpec("compose", exits, [float(w) for w in weights],
                           layers=max(self.exit_depth(e) for e in exits))
        if on_branch:
            raise RequestError("poe.mode", f"mode {mode} runs on the base model only, not on a sibling specialist")
        if mode == "wand":
            safety = float(poe.get("safety", 1.0) if poe.get("safety") is not None else 1.0)
            if safety < 0:
                raise RequestError("poe.safety", f"poe.safety must be >= 0, got {safety}")
            try:
                bounds = resolve_bounds(self.config, poe.get("p99_bounds"))
            except ValueError as e:
                raise RequestError("poe.p99_bounds", str(e)) from None
            return PoeSpec("wand", thresholds=exit_thresholds(bounds, safety))
        n = self.n_base_exits
        draft = poe.get("draft_stage", 0) if poe.get("draft_stage") is not None else 0
        if isinstance(draft, bool) or not isinstance(draft, int) or not 0 <= draft < n - 1:
            raise RequestError("poe.draft_stage", f"poe.draft_stage must be an earlier exit than the last: "
                                                  f"0..{n - 2}, got {draft!r}")
        k = poe.get("k_draft", 3) if poe.get("k_draft") is not None else 3
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise RequestError("poe.k_draft", f"poe.k_draft must be an integer in 1..16, got {k!r}")
        return PoeSpec("speculative", draft_stage=draft, k_draft=k)

    # -----------------------------------------------------------------------------
    # the thread

    def start(self) -> "Engine":
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="cognica-poe-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull at once when max_queue requests already wait."""
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting (--max-queue {self.max_queue})")
            self.waiting.append(request)
            self.cond.notify_all()

    def wake(self) -> None:
        """Let the engine notice a cancellation now, even if it sleeps for lack of work."""
        with self.cond:
            self.cond.notify_all()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def running_rows(self) -> int:
        """Rows holding a place in the batch: decoding in a group or being prefilled."""
        return sum(len(g.rows) for g in list(self.groups.values())) + sum(len(p.rows) for p in list(self.prefilling))

    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self.cond:
                    while not self._stop and not (self.waiting or self.prefilling or self.groups):
                        self.cond.wait(timeout=1.0)
                    if self._stop:
                        return
                try:
                    self.iteration()
                except Exception:  # a bug must not take the server down: fail the rows it touched, keep serving
                    traceback.print_exc()
                    self._fail_all()

    def _fail_all(self) -> None:
        for p in list(self.prefilling):
            self._finish_rows(p.rows, "error")
        for g in list(self.groups.values()):
            self._finish_rows(g.rows, "error")
        self.prefilling.clear()
        self.groups.clear()

    # -----------------------------------------------------------------------------
    # one iteration: expire, admit, one prefill chunk, one step of every group, retire

    @torch.no_grad()
    def iteration(self) -> None:
        now = time.monotonic()
        with self.cond:
            for req in list(self.waiting):
                why = self._ended(req, now)
                if why:
                    self.waiting.remove(req)
                    req.emit(Event(-1, [], finish=why))
            while self.waiting:  # admit in order while the batch has places (a request larger than it, alone)
                if self.running_rows and self.running_rows + self.waiting[0].rows > self.max_batch:
                    break
                self._admit(self.waiting.popleft())
        self._expire(now)
        self._retire()
        budget = self.prefill_chunk  # prompt tokens forwarded this iteration
        while self.prefilling and budget > 0:
            budget -= self._prefill_next()
        for group in list(self.groups.values()):
            self._ensure_room(group)
            {"onepass": self._step_onepass, "wand": self._step_wand, "spec": self._step_spec}[group.kind[0]](group)
            if self.on_step is not None:
                self.on_step(group.kind[0], len(group.rows))
        self._retire()
        self.iterations += 1

    @staticmethod
    def _ended(req: Request, now: float) -> str | None:
        if req.cancelled:
            return "cancelled"
        if req.deadline is not None and now > req.deadline:
            return "timeout"
        return None

    def _expire(self, now: float) -> None:
        """Cancelled or timed-out requests' rows finish now (the next _retire frees their places)."""
        rows = [r for p in self.prefilling for r in p.rows] + [r for g in self.groups.values() for r in g.rows]
        for row in rows:
            why = self._ended(row.request, now) or ("stop" if row.index in row.request.stopped else None)
            if why and row.finish is None:
                self._finish_rows([row], why)
                self.freed_rows += 1

    def _finish_rows(self, rows: list[Row], why: str) -> None:
        for row in rows:
            if row.finish is None:
                row.finish = why
                row.request.emit(Event(row.index, [], finish=why, stats=row.stats()))

    # -----------------------------------------------------------------------------
    # admission and prefill

    def _new_cache(self, batch: int, max_len: int, kind: tuple) -> tuple[CognicaKVCache, dict]:
        cache = self.model.new_cache(batch, max_len, keep_hidden=kind[0] in ("wand", "spec"))
        views = self.siblings.attach(cache, list(range(self.n_base_exits, self.n_exits))) \
            if self.siblings is not None and kind[0] == "onepass" else {}
        return cache, views

    def _admit(self, req: Request) -> None:
        for i, prompt in enumerate(req.prompts):
            rows = [Row(req, i * req.n + j, len(prompt), self.device) for j in range(req.n)]
            self.prefilling.append(Prefill(req, prompt, rows))

    def _prefill_exits(self, poe: PoeSpec) -> list[int]:
        if poe.mode == "wand":
            return list(range(self.n_base_exits))
        if poe.mode == "speculative":
            return [self.n_base_exits - 1]
        return sorted(set(poe.exits))

    def _prefill_next(self) -> int:
        """
        The next prefill work, oldest prompt first: prompts that fit one chunk go together in one pass, consecutive
        ones of the same kind up to prefill_chunk tokens; a longer prompt forwards its next chunk alone (its chunks
        are always the same: prefill_chunk tokens from its start). Returns the prompt tokens forwarded.
        """
        first = self.prefilling[0]
        if first.done or len(first.ids) > self.prefill_chunk:
            return self._prefill_chunk(first)
        batch, tokens = [], 0
        for p in self.prefilling:
            if (p.done or len(p.ids) > self.prefill_chunk or p.request.poe.kind != first.request.poe.kind
                    or tokens + len(p.ids) > self.prefill_chunk and batch):
                break
            batch.append(p)
            tokens += len(p.ids)
        if len(batch) == 1:
            return self._prefill_chunk(first)
        # one pass over the prompts, left-padded to the longest: each is a row of one cache
        L = max(len(p.ids) for p in batch)
        ids = torch.zeros(len(batch), L, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(batch), L, dtype=torch.bool, device=self.device)
        for j, p in enumerate(batch):
            ids[j, L - len(p.ids):] = torch.tensor(p.ids, dtype=torch.long)
            valid[j, L - len(p.ids):] = True
        cache, views = self._new_cache(len(batch), L, first.request.poe.kind)
        exits = sorted({e for p in batch for e in self._prefill_exits(p.request.poe)})
        logits = self._exit_logits(cache, views, ids, exits, valid)
        newcomers = []
        for j, p in enumerate(batch):
            p.cache, p.views, p.row, p.done = cache, views, j, len(p.ids)
            newcomers += self._prefilled(p, {e: x[j:j + 1] for e, x in logits.items()})
        if newcomers:  # they join their group together
            self._join(first.request.poe.kind, newcomers)
        return tokens

    def _prefill_chunk(self, p: Prefill) -> int:
        """Forward the next chunk of one prompt in its own cache; after the last one, _prefilled."""
        if p.cache is None:
            p.cache, p.views = self._new_cache(1, len(p.ids), p.request.poe.kind)
        start, end = p.done, min(p.done + self.prefill_chunk, len(p.ids))
        ids = torch.tensor([p.ids[start:end]], dtype=torch.long, device=self.device)
        logits = self._exit_logits(p.cache, p.views, ids, self._prefill_exits(p.request.poe))
        p.done = end
        if p.done == len(p.ids):
            newcomers = self._prefilled(p, logits)
            if newcomers:
                self._join(p.request.poe.kind, newcomers)
        return end - start

    def _prefilled(self, p: Prefill, logits: dict[int, torch.Tensor]) -> list[tuple]:
        """
        A prompt's last chunk ran (logits: {exit: (1, V)}): choose each row's first token. Returns the rows still
        running, as _join's entries.
        """
        self.prefilling.remove(p)
        poe = p.request.poe
        for row in p.rows:
            if poe.mode == "wand":
                self._wand_choose([row], {s: logits[s] for s in range(self.n_base_exits)})
            elif poe.mode == "speculative":  # the first token is the full model's
                row.layer_runs += self.config.n_layer
                self._choose(row, logits[self.n_base_exits - 1][0])
            else:
                row.layer_runs += poe.layers
                self._choose(row, self._scores(row, {e: logits[e][0] for e in poe.exits}))
        return [(r, p.cache, p.views, p.row) for r in p.rows if r.finish is None]

    def _join(self, kind: tuple, newcomers: list[tuple]) -> None:
        """
        New rows join their group. Rows no longer than the group's slots are appended: their own slots are laid out
        right-aligned to end where the group's do and concatenated to its batch, so the running rows' KV is not
        copied row by row. A longer newcomer repacks the whole group.
        """
        group = self.groups.get(kind)
        if group is None:
            self.groups[kind] = self._repack(kind, newcomers)
            return
        if kind[0] == "wand":  # the appended rows hold every layer: the group must too
            catch_up(self.gpt, group.cache, group.cache.n_slots, self.n_base_exits - 1)
        C = group.cache.n_slots
        longest = max(int(cache.valid[r, :cache.n_slots].sum()) for _, cache, _, r in newcomers)
        if longest > C or C + slots_per_step(kind) > group.cache.max_len:
            old = [(r, group.cache, group.views, i) for i, r in enumerate(group.rows)]
            self.groups[kind] = self._repack(kind, old + newcomers)
            return
        new = self._repack(kind, newcomers, slots=C, max_len=group.cache.max_len)
        for layer in group.cache.layers + [lay for v in group.views.values() for lay in v.own_layers]:
            layer.length = C  # as a repack leaves them: every layer holds the group's slots
        for view in group.views.values():  # and every branch's cache (one on its own device skips steps it is not in)
            view.n_slots = C
        group.cache.append_rows(new.cache)
        for b, view in group.views.items():
            view.append_rows(new.views[b])
        self._follow_rows(group.cache, group.views)
        group.rows += new.rows

    # -----------------------------------------------------------------------------
    # repacking: rows in, rows out, holes removed

    def _repack(self, kind: tuple, entries: list[tuple], slots: int | None = None, max_len: int | None = None
                ) -> Group:
        """
        A new group cache holding `entries` (row, source cache, source views, source row index) in order: each row's
        real slots copied right-aligned to end at slot C = the longest row (or `slots`), with room for the next steps
        after C (or `max_len` slots in all).
        """
        idxs = [cache.valid[r, :cache.n_slots].nonzero()[:, 0] for _, cache, _, r in entries]
        C = max(len(i) for i in idxs) if slots is None else slots
        if max_len is None:
            max_len = min(C + max(self.room, 2 * slots_per_step(kind)), self.config.rotary_seq_len)
        cache, views = self._new_cache(len(entries), max_len, kind)
        for j, ((_, src, src_views, r), idx) in enumerate(zip(entries, idxs)):
            dst = torch.arange(C - len(idx), C, device=self.device)
            pairs = list(zip(cache.layers, src.layers))
            for b, view in views.items():
                pairs += list(zip(view.own_layers, src_views[b].own_layers))
            for d, s in pairs:  # each layer's keys on its own device (placed stages, branches on devices of their own)
                at, of = dst.to(d.keys.device), idx.to(s.keys.device)
                d.keys[j, :, at] = s.keys[r, :, of].to(d.keys.device)
                d.values[j, :, at] = s.values[r, :, of].to(d.keys.device)
            cache.token_ids[j, dst] = src.token_ids[r, idx]
            cache.valid[j, dst] = True
            cache.positions[j, dst] = src.positions[r, idx]
        for layer in cache.layers + [lay for v in views.values() for lay in v.own_layers]:
            layer.length = C
        cache.n_slots = C
        for v in views.values():
            v.n_slots = C
        self._follow_rows(cache, views)
        return Group(kind, [e[0] for e in entries], cache, views)

    def _follow_rows(self, cache: CognicaKVCache, views: dict) -> None:
        """After the rows of a group's cache changed: branches on devices of their own take its slots again."""
        if self.siblings is not None and views:
            self.siblings.follow_rows(cache, views)

    def _retire(self) -> None:
        """Finished rows leave their group: the others are selected along the batch, their slots unchanged."""
        for kind, group in list(self.groups.items()):
            keep = [i for i, r in enumerate(group.rows) if r.finish is None]
            if len(keep) == len(group.rows):
                continue
            if not keep:
                del self.groups[kind]
                continue
            group.cache.keep_rows(keep)
            for view in group.views.values():
                view.keep_rows(keep)
            self._follow_rows(group.cache, group.views)
            group.rows = [group.rows[i] for i in keep]
        for p in list(self.prefilling):
            if all(r.finish is not None for r in p.rows):
                self.prefilling.remove(p)

    def _ensure_room(self, group: Group) -> None:
        need = slots_per_step(group.kind)
        if group.cache.n_slots + need > group.cache.max_len:
            if group.kind[0] == "wand":
                catch_up(self.gpt, group.cache, group.cache.n_slots, self.n_base_exits - 1)
            entries = [(r, group.cache, group.views, i) for i, r in enumerate(group.rows)]
            self.groups[group.kind] = fresh = self._repack(group.kind, entries)
            group.cache, group.views = fresh.cache, fresh.views

    # -----------------------------------------------------------------------------
    # token choice, shared by every mode

    def _exit_logits(self, cache: CognicaKVCache, views: dict, ids: torch.Tensor, exits: list[int],
                     valid: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """{flat exit: next-token logits (B, V)} for new tokens ids (B, T) (valid: their real-token mask), from one
        pass over the needed layers."""
        nb = self.n_base_exits
        if self.siblings is not None and views:
            needed = {e - nb: views[e - nb] for e in exits if e >= nb}
            out = self.siblings.run(cache, needed, ids, valid, exits, logits_to_keep=1)
            return {e: logits[:, -1] for e, logits in zip(exits, out)}
        layers = [self.model.stage_boundary(e) for e in exits]
        hidden = self.gpt.hidden_at_exits(ids, layers, cache, valid, logits_to_keep=1)
        return {e: self.gpt.exit_logits(hidden[b], b)[:, -1] for e, b in zip(exits, layers)}

    @staticmethod
    def _scores(row: Row, logits: dict[int, torch.Tensor]) -> torch.Tensor:
        """A onepass row's next-token scores (V,) from its exits: one exit's logits, or their Log-OP."""
        poe = row.request.poe
        if poe.mode == "compose":
            return log_op([logits[e] for e in poe.exits], poe.weights)
        return logits[poe.exits[0]]

    def _penalized(self, row: Row, scores: torch.Tensor) -> torch.Tensor:
        d = row.request.decoding
        if not (d.presence_penalty or d.frequency_penalty) or not row.tokens:
            return scores
        counts = torch.bincount(torch.tensor(row.tokens, device=scores.device), minlength=scores.size(-1))
        counts = counts[:scores.size(-1)].to(scores.dtype)
        return scores - d.frequency_penalty * counts - d.presence_penalty * (counts > 0).to(scores.dtype)

    def _pick(self, row: Row, scores: torch.Tensor) -> tuple[int, tuple | None]:
        """(token, logprob entry) for one row from scores (V,), with its penalties and sampling settings."""
        d = row.request.decoding
        scores = self._penalized(row, scores.float())
        token = int(choose_tokens(scores[None], row.do_sample, d.temperature if row.do_sample else 1.0,
                                  d.top_k, d.top_p, row.generator)[0])
        return token, self._logprob(row, scores, token)

    @staticmethod
    def _logprob(row: Row, scores: torch.Tensor, token: int) -> tuple | None:
        k = row.request.decoding.logprobs
        if k is None:
            return None
        lp = torch.log_softmax(scores.float(), dim=-1)
        top = torch.topk(lp, k) if k > 0 else None
        alts = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
        return float(lp[token]), alts

    def _choose(self, row: Row, scores: torch.Tensor) -> None:
        token, lp = self._pick(row, scores)
        self._push(row, [token], [lp])

    def _push(self, row: Row, tokens: list[int], logprobs: list) -> None:
        """Append tokens to a row until a stop token or its budget; emit them; the last one becomes pending."""
        d = row.request.decoding
        out, out_lp = [], []
        for t, lp in zip(tokens, logprobs):
            row.decided += 1
            if t in d.stop_ids:
                row.finish = "stop"
                break
            out.append(t)
            out_lp.append(lp)
            row.tokens.append(t)
            if len(row.tokens) >= d.max_tokens:
                row.finish = "length"
                break
        row.pending = tokens[-1] if row.finish is None else None
        row.request.emit(Event(row.index, out, out_lp if d.logprobs is not None else None, row.finish, row.stats()))

    # -----------------------------------------------------------------------------
    # the modes' steps

    def _step_onepass(self, g: Group) -> None:
        ids = torch.tensor([[r.pending] for r in g.rows], dtype=torch.long, device=self.device)
        exits = sorted({e for r in g.rows for e in r.request.poe.exits})
        logits = self._exit_logits(g.cache, g.views, ids, exits)
        for i, row in enumerate(g.rows):
            row.layer_runs += row.request.poe.layers
            self._choose(row, self._scores(row, {e: logits[e][i] for e in row.request.poe.exits}))

    def _wand_choose(self, rows: list[Row], exits: dict[int, torch.Tensor], cache: CognicaKVCache | None = None,
                     shared: dict | None = None) -> None:
        """
        The WAND rule for these rows: each leaves at the first stage whose top-1 margin beats its threshold; a stage
        missing from `exits` is computed on demand (catch-up of pending slots batched with the new token).
        """
        n = self.n_base_exits
        boundaries = self.model.poe_stage_boundary_layers
        thresholds = torch.tensor([r.request.poe.thresholds for r in rows], device=self.device)  # (B, n)
        exit_stage = torch.full((len(rows),), -1, dtype=torch.long, device=self.device)
        chosen = [None] * len(rows)
        for s in range(n):
            if s not in exits:
                got = catch_up(self.gpt, cache, cache.n_slots, s, shared)
                exits[s] = self.gpt.exit_logits(got[s], boundaries[s])[:, -1]
            leave = (exit_stage < 0) & (top2_margin(exits[s]) > thresholds[:, s])
            for i in leave.nonzero()[:, 0].tolist():
                chosen[i] = exits[s][i]
            exit_stage[leave] = s
            if not bool((exit_stage < 0).any()):
                break
        for i, row in enumerate(rows):
            s = int(exit_stage[i])
            row.exit_counts[s] = row.exit_counts.get(s, 0) + 1
            row.layer_runs += boundaries[s] + 1
            self._choose(row, chosen[i])

    def _step_wand(self, g: Group) -> None:
        g.cache.claim(torch.tensor([[r.pending] for r in g.rows], dtype=torch.long, device=self.device))
        self._wand_choose(g.rows, {}, g.cache, {})

    def _step_spec(self, g: Group) -> None:
        """One draft-verify-accept iteration for every row (run_speculative's loop body, per-row sampling)."""
        cache, rows, gpt = g.cache, g.rows, self.gpt
        draft_stage, k_draft = g.kind[1], g.kind[2]
        d_layer = self.model.stage_boundary(draft_stage)
        last = self.config.n_layer - 1
        n = cache.n_slots
        k = max(1, min(k_draft, max(r.remaining for r in rows) - 1))

        def probs(row, logits):
            d = row.request.decoding
            return process_logits(logits, d.temperature, d.top_k, d.top_p).softmax(-1) if row.do_sample else logits

        sampled = [i for i, r in enumerate(rows) if r.do_sample]  # greedy rows are chosen for the batch at once
        cur = torch.tensor([r.pending for r in rows], dtype=torch.long, device=self.device)
        drafts, q = [], []
        for _ in range(k):  # draft: the shallow layers only, one slot at a time
            slot = cache.claim(cur[:, None])
            h = gpt.run_slots(cache, slot, slot + 1, 0, d_layer, [d_layer])[d_layer]
            logits = gpt.exit_logits(h, d_layer)[:, -1]
            cur = choose_tokens(logits, False)  # greedy rows' drafts; each sampling row draws its own below
            for i in sampled:
                d = rows[i].request.decoding
                cur[i] = choose_tokens(logits[i:i + 1], True, d.temperature, d.top_k, d.top_p, rows[i].generator)[0]
            drafts.append(cur)
            q.append({i: probs(rows[i], logits[i]) for i in sampled})
        # verify: the last draft's shallow layers, then the deep layers for all k + 1 slots from the kept stream
        slot = cache.claim(cur[:, None])
        gpt.run_slots(cache, slot, slot + 1, 0, d_layer, [d_layer])  # as a draft step (one graph)
        full = gpt.exit_logits(gpt.run_slots(cache, n, slot + 1, d_layer + 1, last, [last])[last], last)  # (B,k+1,V)
        drafts = torch.stack(drafts, dim=1)  # (B, k)
        n_acc, nexts = speculative_accept(full, None, drafts, False)  # the greedy rule for every row at once
        nexts = nexts.tolist()
        for i in sampled:  # then each sampling row by the sampling rule, with its own generator
            row = rows[i]
            qi = torch.stack([q[j][i] for j in range(k)])[None]
            a, t = speculative_accept(probs(row, full[i])[None], qi, drafts[i:i + 1], True, row.generator)
            n_acc[i], nexts[i] = a[0], int(t[0])
        # roll back: row i keeps slots n .. n + n_acc[i]; the cache ends after the longest row
        new_len = n + 1 + int(n_acc.max())
        cache.crop(new_len)
        short = (n + 1 + n_acc) < new_len
        if bool(short.any()):
            idx = short.nonzero()[:, 0]
            cache.invalidate(idx, n + 1 + n_acc[idx], new_len)
        for i, row in enumerate(rows):
            a = int(n_acc[i])
            tokens = drafts[i, :a].tolist() + [nexts[i]]
            lps = [None] * len(tokens)
            if row.request.decoding.logprobs is not None:
                lps = [self._logprob(row, full[i, j], t) for j, t in enumerate(tokens)]
            row.accepted += a
            row.drafted += k
            row.layer_runs += (k + 1) * (last + 1)
            self._push(row, tokens, lps)
