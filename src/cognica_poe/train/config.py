"""
The run configurations of `cognica-poe train` (TrainConfig) and `cognica-poe sft` (SFTConfig).

Plain dataclasses, apart from the training code, so that the command line builds its flags from them (one flag
per field, the field's help text beside it) without importing torch. Both are saved with every checkpoint.
"""

import dataclasses
from dataclasses import dataclass

from ..presets import PRESETS

AUTOCAST_CHOICES = ("auto", "bf16", "none")


def option(default, help: str):
    """A field with a default and the help text its command-line flag shows."""
    return dataclasses.field(default=default, metadata={"help": help})


def required(help: str):
    """A field without a default: a positional argument on the command line."""
    return dataclasses.field(metadata={"help": help})


@dataclass
class TrainConfig:
    """Everything a run needs; saved in every checkpoint. None model fields come from the preset."""
    # model
    preset: str = option("demo", f"model size to start from: {', '.join(PRESETS)}")
    n_layer: int | None = option(None, "layers (default: the preset's)")
    n_embd: int | None = option(None, "model width (default: the preset's)")
    n_head: int | None = option(None, "query heads (default: the preset's)")
    n_kv_head: int | None = option(None, "key/value heads (default: the preset's)")
    sequence_len: int | None = option(None, "training context in tokens (default: the preset's)")
    window_pattern: str | None = option(None, "attention windows per layer, tiled: S short, L long (default: the "
                                              "preset's)")
    poe_mode: str = option("flat", "flat: stage-wise detached PoE losses; hier: deep supervision without "
                                   "detaching; none: one final loss (the backprop baseline)")
    poe_every: int | None = option(None, "layers per stage (default: the preset's)")
    poe_alpha: float = option(0.0, "total loss = sum of stage losses / K^(1 - alpha): 0 mean, 1 sum")
    # data and tokenizer
    data: str | None = option(None, "text file, .jsonl / .parquet with a `text` field, or a folder of them "
                                    "(default: the bundled Tiny Shakespeare)")
    tokenizer: str | None = option(None, "tokenizer folder (default: train one on the corpus, vocab_size ids)")
    vocab_size: int | None = option(None, "ids of the tokenizer trained here (default: the preset's)")
    shuffle_block: int = option(1024, "documents per shuffled block of the train split")
    # batch and horizon
    device_batch_size: int = option(16, "rows per forward pass on each process")
    total_batch_size: int = option(-1, "tokens per optimizer step (-1: device_batch_size * sequence_len * "
                                       "processes; larger values accumulate gradients)")
    num_steps: int = option(300, "optimizer steps")
    # optimizer
    matrix_lr: float = option(0.02, "Muon learning rate of the block matrices")
    embedding_lr: float = option(0.3, "AdamW learning rate of the embeddings")
    unembedding_lr: float = option(0.008, "AdamW learning rate of lm_head")
    scalar_lr: float = option(0.5, "AdamW learning rate of the scalars (lambdas, gates)")
    weight_decay: float = option(0.28, "weight decay, cosine-scheduled to zero over the run")
    # None = nanochat's sqrt(total_batch_size / 2^19) (0.088 at the demo's 4096 tokens); the default 0.3 is what
    # the poe-d8-classics reference run used at this batch size
    batch_lr_scale: float | None = option(0.3, "learning-rate factor for the batch size (None: nanochat's "
                                               "sqrt(total_batch_size / 2^19))")
    warmup_steps: int = option(40, "steps of linear learning-rate warm-up")
    warmdown_ratio: float = option(0.65, "fraction of the steps spent decaying the learning rate")
    final_lr_frac: float = option(0.05, "learning rate at the end, as a fraction of the peak")
    grad_clip: float = option(0.0, "clip the gradient norm to this (0: off)")
    # eval, logging, checkpoints
    eval_every: int = option(100, "steps between validation BPB evaluations")
    eval_tokens: int = option(40 * 257, "validation tokens per evaluation")
    eval_batch_size: int = option(8, "rows per evaluation forward pass")
    out_dir: str = option("runs/train", "run folder: metrics.jsonl, checkpoints/, tokenizer/, hf/, curves.png")
    save_every: int = option(-1, "steps between checkpoints (-1: only at the end and at --stop-after)")
    keep_checkpoints: int = option(2, "checkpoints kept (older ones are deleted)")
    resume: bool = option(False, "continue from the run folder's latest checkpoint")
    stop_after: int | None = option(None, "save and stop once this many steps are done (an interruption on "
                                          "purpose)")
    export: bool = option(True, "write an HF folder to <out_dir>/hf at the end")
    export_dtype: str = option("bfloat16", "weights dtype of the exported folder")
    progress: bool = option(True, "show a progress bar")
    # system
    seed: int = option(42, "seed of the weights and the data order")
    device: str = option("auto", "auto (cuda if any, else cpu), cpu, cuda or cuda:N")
    compile: bool = option(False, "torch.compile every block")
    autocast: str = option("auto", "mixed precision of training: bf16 (autocast; fp32 weights and optimizer "
                                   "state), none (fp32), auto (bf16 on CUDA, none on CPU)")
    fsdp: bool = option(False, "shard the model over the processes of a torchrun launch (FSDP2)")
    pipeline_parallel: int = option(1, "pipeline ranks of a torchrun launch (flat PoE): each trains a contiguous "
                                       "range of stages; the processes split into this x data parallel")

    def model_overrides(self) -> dict:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        base = dict(PRESETS[self.preset])
        for name in ("n_layer", "n_embd", "n_head", "n_kv_head", "sequence_len", "window_pattern", "poe_every",
                     "vocab_size"):
            if getattr(self, name) is not None:
                base[name] = getattr(self, name)
        base["poe_mode"], base["poe_alpha"] = self.poe_mode, self.poe_alpha
        return base


@dataclass
class SFTConfig:
    model: str = required("a base HF folder (a new specialist is appended) or a stage folder (its leaf trains "
                          "further)")
    data: str = required("conversations: JSONL of {messages: [...]} or ShareGPT {conversations: [...]}, or a "
                         "JSON list of them")
    out_dir: str = option("runs/sft", "run folder: metrics.jsonl, checkpoints/, stage/")
    new_layers: int = option(2, "layers of a new specialist (ignored for a stage folder)")
    steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "conversations per step")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay (the specialist's own tensors only)")
    val_fraction: float = option(0.1, "fraction of the conversations held out for validation")
    eval_every: int = option(25, "steps between validation losses")
    save_every: int = option(50, "steps between checkpoints")
    keep_checkpoints: int = option(100, "checkpoints kept (older ones are deleted)")
    seed: int = option(0, "seed of the new layers and the batch order")
    resume: bool = option(False, "continue from the run folder's latest checkpoint")
    train_special_rows: bool = option(False, "also train the wte rows of the chat special tokens (not BOS)")
