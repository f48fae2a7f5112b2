"""Sibling specialists on one shared trunk: exits equal each specialist alone, composition exact, trunk run once."""

import shutil

import pytest
import torch
from conftest import perturbed_model, specialize
from test_specialist import train_like

from cognica_poe import CognicaPoEForCausalLM, load_siblings
from cognica_poe.checkpoint import export_hf_folder, save_stage_folder
from cognica_poe.hf import load_folder

BRANCHES = (("math", 2, "dual"), ("code", 3, "spec"), ("tool", 1, "base"))  # name, new layers, head_mode


def make_siblings(parent, parent_ref: str, root, seed: int = 0) -> dict[str, str]:
    """Stage folders of three 'trained' sibling specialists of `parent` (saved in fp32: the trunk stays bit-equal)."""
    folders = {}
    for k, (name, layers, mode) in enumerate(BRANCHES):
        spec = train_like(specialize(parent, layers, head_mode=mode, seed=seed + k), seed + 10 + k)
        folders[name] = save_stage_folder(spec, str(root / name), parent_ref, dtype="float32")
    return folders


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("siblings")
    base_dir = export_hf_folder(perturbed_model(seed=1), None, str(root / "base"), dtype="float32")
    folders = make_siblings(CognicaPoEForCausalLM.from_pretrained(base_dir).eval(), base_dir, root)
    return base_dir, folders, load_siblings(base_dir, list(folders.values()), names=list(folders))


def prompt_batch(seed: int, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Left-padded BOS-prefixed random prompts: (ids (B, L), attention_mask (B, L), the unpadded rows)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(1, 512, (n - 1,), generator=g)])
            for n in lengths]
    L = max(lengths)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = r, 1
    return ids, mask, rows


# -----------------------------------------------------------------------------
# exits


def test_exits_equal_base_and_each_specialist_alone(family):
    base_dir, folders, sib = family
    assert sib.n_base_exits == 4 and sib.n_exits == 7
    assert sib.exit_names == ["base:0", "base:1", "base:2", "base:3", "math", "code", "tool"]
    ids, mask, rows = prompt_batch(0, [30, 30])
    base = CognicaPoEForCausalLM.from_pretrained(base_dir).eval()
    got = sib.forward_exits(ids)
    with torch.no_grad():
        for a, b in zip(got[:4], base.gpt.forward_all_stages(ids)):
            assert (a - b).abs().max() < 1e-5
        for i, folder in enumerate(folders.values()):
            want = load_folder(folder).gpt.forward_all_stages(ids)[-1]
            assert (got[4 + i] - want).abs().max() < 1e-5
            assert (got[4 + i] - got[3]).abs().max() > 1e-3  # each branch really is a different exit
    # any subset, by index or name, in the order asked; left padding gives each row's logits alone
    ids, mask, rows = prompt_batch(1, [9, 14])
    sub = sib.forward_exits(ids, ["code", 1, -1], attention_mask=mask)
    with torch.no_grad():
        for i, row in enumerate(rows):
            alone = sib.forward_exits(row[None], [5, 1, 6])
            for a, b in zip(sub, alone):
                assert (a[i, -len(row):] - b[0]).abs().max() < 1e-5


def test_base_tensors_are_shared_not_copied(family):
    _, _, sib = family
    trunk = sib.base.gpt
    for branch in sib.branches:
        gpt = branch.gpt
        assert all(gpt.transformer.h[i] is trunk.transformer.h[i] for i in range(4))
        assert gpt.transformer.wte is trunk.transformer.wte and gpt.lm_head is trunk.lm_head
        assert gpt.value_embeds is trunk.value_embeds and gpt.smear_gate is trunk.smear_gate
    unique = {id(p): p.numel() for m in [sib.base] + sib.branches for p in m.parameters()}
    own = sum(sum(p.numel() for n, p in b.gpt.named_parameters(remove_duplicate=False)
                  if n.startswith("lm_head_stage") or n.endswith("_lambdas")
                  or (n.startswith("transformer.h.") and int(n.split(".")[2]) >= 4)) for b in sib.branches)
    assert sum(unique.values()) == sib.base.num_parameters() + own


def test_chained_base(tmp_path):
    """The base may itself be a specialist (base -> A); siblings of A fold A's stage head once, shared."""
    base_dir = export_hf_folder(perturbed_model(seed=3), None, str(tmp_path / "base"), dtype="float32")
    a = train_like(specialize(CognicaPoEForCausalLM.from_pretrained(base_dir), 2, seed=0), 5)
    a_dir = save_stage_folder(a, str(tmp_path / "A"), base_dir, dtype="float32")
    folders = make_siblings(load_folder(a_dir), a_dir, tmp_path, seed=20)
    sib = load_siblings(a_dir, list(folders.values()))
    assert sib.n_base_exits == 5 and sib.names == list(folders)
    assert sib.branches[0].gpt.ancestor_heads is sib.branches[2].gpt.ancestor_heads
    ids, _, _ = prompt_batch(2, [25])
    got = sib.forward_exits(ids)
    with torch.no_grad():
        for a_exit, b in zip(got[:5], load_folder(a_dir).gpt.forward_all_stages(ids)):
            assert (a_exit - b).abs().max() < 1e-5
        for i, folder in enumerate(folders.values()):
            assert (got[5 + i] - load_folder(folder).gpt.forward_all_stages(ids)[-1]).abs().max() < 1e-5


# -----------------------------------------------------------------------------
# composition


def reference_composition(parts, weights, row: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy Log-OP without the new code or a cache: parts are (separately loaded model, its exit index)."""
    seq = row[None]
    with torch.no_grad():
        for _ in range(n):
            logits = [model.gpt.forward_all_stages(seq, [model.stage_boundary(k)], logits_to_keep=1)[0][:, -1]
                      for model, k in parts]
            score = sum(w * torch.log_softmax(lg, dim=-1) for w, lg in zip(weights, logits))
            seq = torch.cat([seq, score.argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(row):]


def test_composition_equals_uncached_log_op_of_separate_models(family):
    base_dir, folders, sib = family
    base = CognicaPoEForCausalLM.from_pretrained(base_dir).eval()
    alone = {name: load_folder(folder) for name, folder in folders.items()}
    cases = [([3, "math", "code"], [0.5, 1.0, 2.0], [(base, 3), (alone["math"], -1), (alone["code"], -1)]),
             (["math", "tool"], None, [(alone["math"], -1), (alone["tool"], -1)]),
             ([1, "code"], [1.0, 0.7], [(base, 1), (alone["code"], -1)])]
    n = 10
    for seed, (stages, weights, parts) in enumerate(cases):
        w = weights or [1.0] * len(stages)
        for lengths in ([7], [5, 11]):
            ids, mask, rows = prompt_batch(seed * 10 + len(lengths), lengths)
            out = sib.generate_parallel_composition(ids, stages=stages, stage_weights=weights, max_new_tokens=n,
                                                    stop_tokens=[], attention_mask=mask)
            assert out.shape == (len(rows), ids.size(1) + n)
            for i, row in enumerate(rows):
                assert torch.equal(out[i, ids.size(1):], reference_composition(parts, w, row, n)), (stages, lengths)


def test_stage_mode_from_one_branch_equals_that_specialist(family):
    _, folders, sib = family
    ids, mask, _ = prompt_batch(5, [6, 10])
    alone = load_folder(folders["code"])
    want = alone.generate_stage(ids, stage=alone.poe_n_stages - 1, max_new_tokens=15, stop_tokens=[],
                                attention_mask=mask)
    assert torch.equal(sib.generate_stage(ids, "code", max_new_tokens=15, stop_tokens=[], attention_mask=mask), want)


def test_trunk_runs_once_per_position(family):
    _, _, sib = family
    trunk_blocks = list(sib.base.gpt.transformer.h)
    own_blocks = [b.gpt.transformer.h[i] for b in sib.branches for i in range(4, b.config.n_layer)]
    positions = {}  # block -> positions it ran, summed over calls
    hooks = [m.register_forward_pre_hook(lambda m, a: positions.__setitem__(m, positions.get(m, 0) + a[0].size(1)))
             for m in trunk_blocks + own_blocks]
    try:
        ids = torch.tensor([[0, 5, 6, 7, 8]])
        sib.generate_parallel_composition(ids, stages=[3, "math", "code", "tool"], max_new_tokens=8, stop_tokens=[])
    finally:
        for h in hooks:
            h.remove()
    # the prompt's 5 positions + 7 fed-back tokens, once per block: the trunk is not run once per branch
    assert all(positions[m] == 12 for m in trunk_blocks + own_blocks), positions.values()
    # a branch's cache stores only its own layers; the trunk's layers are the trunk cache's objects
    cache = sib.base.new_cache(1, 16)
    view = cache.extended(sib.branches[1].config)
    assert all(view.layers[i] is cache.layers[i] for i in range(4)) and len(view.layers) == 7
    assert view.token_ids is cache.token_ids and view.hidden is cache.hidden


def test_sampling_seeded_and_options(family):
    _, _, sib = family
    ids, mask, _ = prompt_batch(7, [6, 9])
    kw = dict(stages=[3, "math"], max_new_tokens=20, stop_tokens=[], attention_mask=mask)
    greedy = sib.generate_parallel_composition(ids, **kw)
    a = sib.generate_parallel_composition(ids, do_sample=True, temperature=1.5, seed=11, **kw)
    b = sib.generate_parallel_composition(ids, do_sample=True, temperature=1.5, seed=11, **kw)
    c = sib.generate_parallel_composition(ids, do_sample=True, temperature=1.5, seed=12, **kw)
    assert torch.equal(a, b) and not torch.equal(a, greedy) and not torch.equal(a, c)
    top = sib.generate_parallel_composition(ids, do_sample=True, top_k=5, top_p=0.9, seed=3, **kw)
    assert top.shape == greedy.shape
    # streamer and stop tokens
    streamed = []
    stop = int(greedy[0, ids.size(1) + 2])
    out = sib.generate_parallel_composition(ids[:1], stages=[3, "math"], max_new_tokens=20, stop_tokens=[stop],
                                            streamer=lambda row, t: streamed.append(t))
    first_stop = greedy[0, ids.size(1):].tolist().index(stop)
    assert out[0, ids.size(1):].tolist() == greedy[0, ids.size(1):ids.size(1) + first_stop + 1].tolist() == streamed
    with pytest.raises(ValueError, match="exceeds the context"):
        sib.generate_parallel_composition(ids, stages=["math"], max_new_tokens=300)


# -----------------------------------------------------------------------------
# errors


def test_clear_errors(family, tmp_path):
    base_dir, folders, sib = family
    base = CognicaPoEForCausalLM.from_pretrained(base_dir).eval()
    # a sibling of another base
    other_dir = export_hf_folder(perturbed_model(seed=2), None, str(tmp_path / "other"), dtype="float32")
    stray = save_stage_folder(specialize(CognicaPoEForCausalLM.from_pretrained(other_dir), 2, seed=0),
                              str(tmp_path / "stray"), other_dir, dtype="float32")
    with pytest.raises(ValueError, match="not a specialist of this base.*tensor"):
        load_siblings(base, [folders["math"], stray])
    # a specialist of a specialist (its parent is the math stage, not this base)
    grandchild = save_stage_folder(specialize(load_folder(folders["math"]), 1, seed=0),
                                   str(tmp_path / "grand"), folders["math"], dtype="float32")
    with pytest.raises(ValueError, match="not a specialist of this base.*n_layer"):
        load_siblings(base, [grandchild])
    with pytest.raises(ValueError, match="not a stage folder"):
        load_siblings(base, [base_dir])
    # a delta whose embedding is not the trunk's (bf16 of an fp32 base)
    rounded = save_stage_folder(specialize(base, 1, seed=0), str(tmp_path / "bf16"), base_dir, dtype="bfloat16")
    with pytest.raises(ValueError, match="wte.weight differs"):
        load_siblings(base, [rounded])
    # the same base in another folder is still this base
    copy_dir = shutil.copytree(base_dir, str(tmp_path / "copy"))
    on_copy = save_stage_folder(specialize(base, 1, seed=0), str(tmp_path / "on_copy"), copy_dir, dtype="float32")
    assert load_siblings(base, [folders["math"], on_copy]).n_exits == 6
    with pytest.raises(ValueError, match="distinct"):
        load_siblings(base, [folders["math"], folders["math"]])
    ids = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="out of range.*7 exits"):
        sib.forward_exits(ids, [7])
    with pytest.raises(ValueError, match="out of range"):
        sib.generate_parallel_composition(ids, stages=[True])
    with pytest.raises(ValueError, match="no branch named 'poetry'"):
        sib.generate_parallel_composition(ids, stages=["poetry"])
    with pytest.raises(ValueError, match="stage_weights has 1 entries but stages has 2"):
        sib.generate_parallel_composition(ids, stages=[3, "math"], stage_weights=[1.0])
    with pytest.raises(ValueError, match="at least one"):
        sib.generate_parallel_composition(ids, stages=[])


def test_numpy_integer_exits_are_accepted(family):
    import numpy as np

    _, _, sib = family
    assert sib.exit_index(np.int64(5)) == 5 and sib.exit_index(np.int32(-1)) == 6
    ids = torch.tensor([[0, 5, 6]])
    assert torch.equal(sib.generate_stage(ids, np.int64(4), max_new_tokens=3, stop_tokens=[]),
                       sib.generate_stage(ids, "math", max_new_tokens=3, stop_tokens=[]))


def test_cli_generates_from_siblings(tmp_path, capsys):
    """`cognica-poe generate BASE --siblings A B --mode compose --stages 3 math code` == the Python API."""
    import os

    from cognica_poe.cli import main as cli_main
    from cognica_poe.tokenizer_train import train_bpe

    corpus = os.path.join(os.path.dirname(__file__), "..", "src", "cognica_poe", "data", "tinyshakespeare.txt")
    with open(corpus, encoding="utf-8") as f:
        tok = train_bpe(iter(f.read()[:100_000].split("\n\n")), vocab_size=512)
    base_dir = export_hf_folder(perturbed_model(seed=3, vocab_size=len(tok)), tok, str(tmp_path / "base"),
                                dtype="float32")
    folders = make_siblings(CognicaPoEForCausalLM.from_pretrained(base_dir).eval(), base_dir, tmp_path)
    ids = torch.tensor([[tok.bos_token_id] + tok("ROMEO:")["input_ids"]])
    sib = load_siblings(base_dir, [folders["math"], folders["code"]])
    for mode_args, want in (
            (["--mode", "compose", "--stages", "3", "math", "code"],
             sib.generate_parallel_composition(ids, stages=[3, "math", "code"], max_new_tokens=5, stop_tokens=[])),
            (["--mode", "stage", "--stage", "code"],
             sib.generate_stage(ids, "code", max_new_tokens=5, stop_tokens=[]))):
        for placed in ([], ["--device-map", '{"trunk": "cpu", "math": "cpu", "code": "cpu"}']):  # placed branches
            assert cli_main(["generate", base_dir, "ROMEO:", "--siblings", folders["math"], folders["code"],
                             "--max-new-tokens", "5", "--stop", *mode_args, *placed]) == 0
            assert capsys.readouterr().out == tok.decode(want[0, ids.size(1):]) + "\n"
    assert cli_main(["generate", base_dir, "ROMEO:", "--siblings", folders["math"], "--mode", "wand"]) == 2
    assert "--siblings works with" in capsys.readouterr().err
    for device_map, message in (('{"stage:0": "cpu"}', "device_map names ['stage:0']: its keys are 'trunk' and the "
                                                       "branch names ['math']"),
                                ("ranks", 'device_map = \'ranks\': sibling specialists take a map of the trunk and '
                                          'the branches to devices, e.g. \'{"trunk": "cuda:0", "math": "cuda:1"}\'')):
        assert cli_main(["generate", base_dir, "ROMEO:", "--siblings", folders["math"], "--mode", "stage",
                         "--device-map", device_map]) == 2
        assert capsys.readouterr().err.splitlines() == [f"cognica-poe generate: error: {message}"]
