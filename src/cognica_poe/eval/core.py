"""
CORE-style in-context evaluation (nanochat's protocol, DCLM's task set), scored at every stage exit.

A task bundle folder holds `core.yaml` (`icl_tasks`: label, dataset_uri, num_fewshot, icl_task_type,
continuation_delimiter), `eval_meta_data.csv` ("Eval Task", "Random baseline" in percent) and
`eval_data/**.jsonl`, the layout of nanochat's eval_bundle. Three task types:
  multiple_choice    {"query", "choices", "gold"}: each choice is scored as a continuation of the query; the
                     lowest mean cross-entropy over the choice's tokens wins.
  schema             {"context_options", "continuation", "gold"}: the same continuation after each context;
                     the lowest mean cross-entropy over the continuation wins.
  language_modeling  {"context", "continuation"}: correct only if the greedy argmax reproduces every
                     continuation token.
Items are shuffled with random.Random(1337) and truncated to max_per_task; item i's few-shot examples are
random.Random(1234 + i).sample(other items, k), joined with blank lines. Every sequence starts with BOS.
Accuracy is centered against the random baseline, (acc - b) / (1 - b); CORE is the mean centered accuracy.
All exits come from ONE forward pass per sequence (`forward_all_stages`), so a stage costs nothing extra.
"""

import csv
import json
import os
import random

import torch
import torch.nn.functional as F

TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def load_bundle(folder: str) -> list[dict]:
    """The tasks of a bundle folder, each with its items and random baseline (a fraction)."""
    import yaml

    with open(os.path.join(folder, "core.yaml")) as f:
        spec = yaml.safe_load(f)
    baselines = {}
    meta = os.path.join(folder, "eval_meta_data.csv")
    if os.path.isfile(meta):
        with open(meta, newline="") as f:
            for row in csv.DictReader(f):
                baselines[row["Eval Task"]] = float(row["Random baseline"]) / 100.0
    tasks = []
    for t in spec["icl_tasks"]:
        kind = t["icl_task_type"]
        if kind not in TASK_TYPES:
            raise ValueError(f"task {t['label']}: unknown icl_task_type {kind!r} (expected one of {TASK_TYPES})")
        shots = t.get("num_fewshot", [0])
        path = os.path.join(folder, "eval_data", t["dataset_uri"])
        with open(path) as f:
            items = [json.loads(line) for line in f if line.strip()]
        tasks.append({"label": t["label"], "type": kind, "k": shots[0] if isinstance(shots, list) else int(shots),
                      "delimiter": t.get("continuation_delimiter", " "), "items": items,
                      "baseline": baselines.get(t["label"], 0.0)})
    return tasks


def render(task: dict, items: list[dict], i: int) -> list[tuple[str, str]]:
    """(prompt, full text) for each candidate of item i, few-shot examples included."""
    k, delim, item = task["k"], task["delimiter"], items[i]
    others = [j for j in range(len(items)) if j != i]
    shots = [items[j] for j in random.Random(1234 + i).sample(others, min(k, len(others)))] if k else []
    kind = task["type"]
    if kind == "multiple_choice":
        prefix = "".join(s["query"] + delim + s["choices"][s["gold"]] + "\n\n" for s in shots)
        prompt = prefix + item["query"] + delim
        return [(prompt, prompt + c) for c in item["choices"]]
    if kind == "schema":
        prefix = "".join(s["context_options"][s["gold"]] + delim + s["continuation"] + "\n\n" for s in shots)
        return [(prefix + c + delim, prefix + c + delim + item["continuation"]) for c in item["context_options"]]
    prefix = "".join(s["context"].strip() + delim + s["continuation"] + "\n\n" for s in shots)
    prompt = prefix + item["context"].strip() + delim
    return [(prompt.strip(), prompt + item["continuation"])]


def encode_pair(tok, prompt: str, full: str) -> tuple[list[int], int]:
    """BOS + ids of the full text, and where the continuation starts (after the prompt's common token prefix)."""
    ids = tok.encoding.encode_ordinary(full)
    head = tok.encoding.encode_ordinary(prompt)
    start = 0
    while start < min(len(ids), len(head)) and ids[start] == head[start]:
        start += 1
    start = min(start, len(ids) - 1)  # at least one continuation token
    return [tok.bos_token_id] + ids, 1 + start


@torch.no_grad()
def score_item(gpt, tok, task: dict, items: list[dict], i: int, boundaries: list[int]) -> list[bool]:
    """Whether each exit gets item i right."""
    seqs = [encode_pair(tok, prompt, full) for prompt, full in render(task, items, i)]
    max_len = gpt.config.sequence_len
    seqs = [(ids[-max_len:], max(1, start - max(0, len(ids) - max_len))) for ids, start in seqs]
    T = max(len(ids) for ids, _ in seqs)
    pad = tok.bos_token_id
    batch = torch.tensor([ids + [pad] * (T - len(ids)) for ids, _ in seqs], device=gpt.device)
    exits = gpt.forward_all_stages(batch, boundaries)  # right padding: real positions never see the pads
    right = []
    for logits in exits:
        if task["type"] == "language_modeling":
            ids, start = seqs[0]
            target = torch.tensor(ids[start:], device=logits.device)
            right.append(bool(torch.equal(logits[0, start - 1:len(ids) - 1].argmax(-1), target)))
            continue
        losses = []
        for row, (ids, start) in enumerate(seqs):
            target = torch.tensor(ids[start:], device=logits.device)
            losses.append(F.cross_entropy(logits[row, start - 1:len(ids) - 1].float(), target).item())
        gold = items[i]["gold"]
        right.append(min(range(len(losses)), key=losses.__getitem__) == gold)
    return right


def evaluate_core(model, tok, folder: str, max_per_task: int = -1, stages: list[int] | None = None) -> dict:
    """Per task and per exit: accuracy and centered accuracy; CORE (mean centered) per exit."""
    gpt = model.gpt
    stages = list(range(model.poe_n_stages)) if stages is None else stages
    boundaries = [model.stage_boundary(s) for s in stages]
    results = {"stages": stages, "tasks": {}}
    for task in load_bundle(folder):
        items = list(task["items"])
        random.Random(1337).shuffle(items)
        if max_per_task > 0:
            items = items[:max_per_task]
        correct = [0] * len(stages)
        for i in range(len(items)):
            for s, ok in enumerate(score_item(gpt, tok, task, items, i, boundaries)):
                correct[s] += ok
        acc = [c / len(items) for c in correct]
        b = task["baseline"]
        results["tasks"][task["label"]] = {"type": task["type"], "n": len(items), "baseline": b, "accuracy": acc,
                                           "centered": [(a - b) / (1 - b) for a in acc]}
    n = len(results["tasks"])
    results["core"] = [sum(t["centered"][s] for t in results["tasks"].values()) / n for s in range(len(stages))]
    return results
