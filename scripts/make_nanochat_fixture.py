#!/usr/bin/env python3
"""Build the "golden" nanochat fixture in tests/fixtures/nanochat_tiny/.

The fixture is produced by nanochat's OWN model code (imported from a separate
checkout given with --nanochat; no nanochat code is copied into this repository),
so that cognica_poe's re-implementation can be checked against nanochat itself.

What it does:
  * forces nanochat onto fp32 compute on CPU (NANOCHAT_DTYPE=float32, set before
    nanochat is imported) and onto its SDPA attention fallback (FA3 is only tried
    when CUDA is available; we also set flash_attention._override_impl='sdpa' and
    USE_FA3=False explicitly). On a CPU-only torch nanochat never imports the
    `kernels` package, so no stub is needed.
  * builds GPT(GPTConfig(sequence_len=256, vocab_size=300, n_layer=4, n_head=4,
    n_kv_head=2, n_embd=64, window_pattern="SSSL")) on the meta device,
    to_empty(cpu), torch.manual_seed(0), init_weights();
  * perturbs every parameter with a fixed-seed generator so nothing sits at a
    degenerate init (zero c_proj, smear_lambda=0, ...);
  * rounds wte and value_embeds to bf16 and stores them as bf16 (as nanochat's
    bf16-trained checkpoints do). nanochat's forward handles bf16 embedding tables
    with fp32 compute natively: wte(idx) is cast with x.to(COMPUTE_DTYPE) and
    value embeddings with .to(x.dtype), so the forward runs on exactly the saved
    weights;
  * runs logits = model(ids) and loss = model(ids, targets) and saves
      model_000000.pt      state_dict, every key prefixed "_orig_mod."
      meta_000000.json     {"step", "model_config", "user_config"}
      golden.safetensors   input_ids (2,200) int64, targets (2,200) int64,
                           logits (2,200,300) fp32, loss () fp32
      README.md

Usage:
  python scripts/make_nanochat_fixture.py --nanochat /path/to/nanochat [--out tests/fixtures/nanochat_tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

NANOCHAT_COMMIT = "92d63d4e8bb4df75c3b71618f31ddde2378b2bcd"

CONFIG = dict(sequence_len=256, vocab_size=300, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, window_pattern="SSSL")
INIT_SEED = 0
PERTURB_SEED = 1234
IDS_SEED = 4321
BATCH, SEQ = 2, 200


def parse_args() -> argparse.Namespace:
    repo_root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanochat", required=True, type=Path,
                   help="path to a nanochat checkout (the directory holding nanochat/gpt.py)")
    p.add_argument("--out", type=Path, default=repo_root / "tests" / "fixtures" / "nanochat_tiny")
    return p.parse_args()


def git_head(path: Path) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or None
    except Exception:
        return None


def perturb_(model, torch) -> None:
    """Move every parameter away from its init, deterministically (own generator, named_parameters order)."""
    g = torch.Generator().manual_seed(PERTURB_SEED)

    def noise(p, std):
        return torch.randn(p.shape, generator=g, dtype=torch.float32) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "smear_lambda":
                p.copy_(0.5 + noise(p, 0.05))
            elif name == "backout_lambda":
                p.copy_(0.3 + noise(p, 0.05))
            elif name in ("resid_lambdas", "x0_lambdas"):
                p.add_(noise(p, 0.1))
            elif name == "lm_head.weight":
                # init std is 0.001, which would give near-uniform logits; make them informative but not saturated
                p.add_(noise(p, 0.15))
            elif name in ("smear_gate.weight",) or name.endswith("ve_gate.weight"):
                # gates: make sigmoid inputs vary per token
                p.add_(noise(p, 0.3))
            else:
                p.add_(noise(p, 0.02).to(p.dtype))


def main() -> None:
    args = parse_args()
    nanochat_path = args.nanochat.resolve()
    if not (nanochat_path / "nanochat" / "gpt.py").is_file():
        sys.exit(f"--nanochat {nanochat_path} does not look like a nanochat checkout (no nanochat/gpt.py)")

    # Must happen before nanochat.common is imported: COMPUTE_DTYPE is read once at import time.
    os.environ["NANOCHAT_DTYPE"] = "float32"
    sys.path.insert(0, str(nanochat_path))

    import nanochat.flash_attention as nfa
    import torch
    from nanochat.common import COMPUTE_DTYPE
    from nanochat.gpt import GPT, GPTConfig
    from safetensors.torch import save_file

    assert COMPUTE_DTYPE == torch.float32, COMPUTE_DTYPE
    # Force the SDPA path (it already is on CPU: FA3 is only attempted when CUDA is available).
    nfa._override_impl = "sdpa"
    nfa.USE_FA3 = nfa._resolve_use_fa3()
    assert nfa.USE_FA3 is False

    torch.use_deterministic_algorithms(True)

    config = GPTConfig(**CONFIG)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    torch.manual_seed(INIT_SEED)
    model.init_weights()
    perturb_(model, torch)

    # bf16 embeddings, as in nanochat's bf16-trained checkpoints. The model keeps exactly these bf16 tables.
    model.transformer.wte.to(dtype=torch.bfloat16)
    for ve in model.value_embeds.values():
        ve.to(dtype=torch.bfloat16)
    model.eval()

    g = torch.Generator().manual_seed(IDS_SEED)
    ids = torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=g, dtype=torch.long)
    targets = torch.full_like(ids, -1)  # next-token targets; last position ignored (ignore_index=-1)
    targets[:, :-1] = ids[:, 1:]

    with torch.no_grad():
        logits = model(ids)
        loss = model(ids, targets)
    assert logits.dtype == torch.float32, logits.dtype
    assert logits.shape == (BATCH, SEQ, config.vocab_size), logits.shape
    std = logits.std().item()
    frac_sat = (logits.abs() > 13.5).float().mean().item()
    assert 0.5 <= std <= 5.0, f"logits std {std} out of the intended range"
    assert frac_sat < 1e-3, f"too many logits near the softcap: {frac_sat}"

    sd = model.state_dict()
    assert set(sd) == {n for n, _ in model.named_parameters()}, "unexpected buffers in the state_dict"
    sd = {f"_orig_mod.{k}": v.detach().clone().contiguous() for k, v in sd.items()}

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.save(sd, out / "model_000000.pt")
    meta = {
        "step": 0,
        "model_config": dict(CONFIG),
        "user_config": {"note": "golden fixture", "nanochat_commit": NANOCHAT_COMMIT},
    }
    with open(out / "meta_000000.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    save_file(
        {"input_ids": ids.contiguous(), "targets": targets.contiguous(),
         "logits": logits.detach().contiguous(), "loss": loss.detach().reshape(()).float().contiguous()},
        str(out / "golden.safetensors"),
        metadata={"nanochat_commit": NANOCHAT_COMMIT},  # one key: multi-key header order is not stable
    )

    head = git_head(nanochat_path)
    if head is not None and head != NANOCHAT_COMMIT:
        print(f"WARNING: nanochat checkout is at {head}, not {NANOCHAT_COMMIT}; the README still names the latter")
    readme = f"""# nanochat_tiny: golden fixture produced by nanochat's own model code

Generated by `scripts/make_nanochat_fixture.py` from nanochat (https://github.com/karpathy/nanochat)
at commit `{NANOCHAT_COMMIT}`, importing nanochat from a separate checkout
(no nanochat code lives in this repository). Used to check that cognica_poe reproduces nanochat's
forward pass and loads its checkpoint format.

Model: `GPT(GPTConfig({", ".join(f"{k}={v!r}" for k, v in CONFIG.items())}))`
(vocab 300 is padded to {model.transformer.wte.weight.shape[0]}; GQA 4 query / 2 kv heads;
window sizes {[w for w, _ in model.window_sizes]}, so with T=200 layers 0-2 use a sliding window and layer 3 is causal).
Built on the meta device, `to_empty("cpu")`, `torch.manual_seed({INIT_SEED}); init_weights()`, then every
parameter perturbed away from its init with `torch.Generator().manual_seed({PERTURB_SEED})`
(smear_lambda ~0.5, backout_lambda ~0.3, ...). `transformer.wte.weight` and `value_embeds.*` are stored in
bf16 (as nanochat's bf16 checkpoints); everything else fp32. Forward run by nanochat in fp32 on CPU
(`NANOCHAT_DTYPE=float32`) with its SDPA attention path, on exactly the stored weights.

Files:
- `model_000000.pt`: `torch.save` of the state_dict, every key prefixed `_orig_mod.`
  (loadable with `torch.load(..., weights_only=True)`).
- `meta_000000.json`: nanochat-style metadata (`step`, `model_config` = the 7 GPTConfig fields, `user_config`).
- `golden.safetensors`: `input_ids` (2, 200) int64 (seed {IDS_SEED}, ids in [0, 300)),
  `targets` (2, 200) int64 (= input_ids shifted left by one, last column -1 = ignored),
  `logits` (2, 200, 300) fp32 = `model(input_ids)`,
  `loss` () fp32 = `model(input_ids, targets)` (mean cross-entropy, ignore_index=-1).

Regenerate (from the repository root, with torch {torch.__version__.split("+")[0]}):

```
git clone https://github.com/karpathy/nanochat /tmp/nanochat && git -C /tmp/nanochat checkout {NANOCHAT_COMMIT}
python scripts/make_nanochat_fixture.py --nanochat /tmp/nanochat --out tests/fixtures/nanochat_tiny
```
"""
    (out / "README.md").write_text(readme, encoding="utf-8")

    n_params = sum(p.numel() for p in model.parameters())
    print(f"nanochat: {nanochat_path} (git HEAD: {head or 'unknown'}; expected {NANOCHAT_COMMIT})")
    print(f"compute dtype {COMPUTE_DTYPE}, USE_FA3={nfa.USE_FA3}, window_sizes={model.window_sizes}")
    print(f"params: {n_params:,} ({len(sd)} tensors); padded vocab {model.transformer.wte.weight.shape[0]}")
    print(f"logits {tuple(logits.shape)} {logits.dtype}: mean {logits.mean().item():.4f} std {std:.4f} "
          f"min {logits.min().item():.4f} max {logits.max().item():.4f} |x|>13.5: {frac_sat:.2e}")
    print(f"loss {loss.item():.6f} (ln 300 = {torch.log(torch.tensor(300.0)).item():.6f})")
    for f in sorted(out.iterdir()):
        print(f"  {f.name}: {f.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
