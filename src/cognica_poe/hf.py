"""
The transformers face of the model: CognicaPoEForCausalLM (PreTrainedModel + GenerationMixin).

It holds the core GPT as `.gpt` (so safetensors keys are the core keys prefixed "gpt.") and serves
`generate()` with our CognicaKVCache: greedy, sampling, batches with left padding. Rotary positions come
from the attention mask, so a padded row decodes exactly as it would alone. The stage-level API
(`poe_n_stages`, `poe_stage_boundary_layers`, `forward_stage`) lives here too, and the inference modes (which
work on the core GPT, in files of their own) are one-line methods of this class. `load_folder` is the one
loader of a model folder: a base folder, or a stage folder assembled on its ancestors.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import os
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import CognicaKVCache
from .compose import generate_parallel_composition
from .config import CognicaPoEConfig
from .model import GPT
from .placement import place_device_map
from .prefix import generate_stage
from .sampling import warn_if_missing_bos
from .specialist import is_stage_folder, load_stage_folder
from .speculative import generate_speculative
from .wand import generate_wand
from .weights import check_shapes, expected_shapes, safetensors_shapes, strip_prefixes

# transformers 5.x renamed `past_key_values` to `cache`; accept and return whichever this install uses
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def check_vocab_shape(which: str, module: nn.Module, shape: torch.Size) -> None:
    """wte, lm_head and the value embeddings are all vocab-sized: a replacement keeps the shape."""
    got = tuple(module.weight.shape) if isinstance(module, (nn.Embedding, nn.Linear)) else None
    if got != tuple(shape):
        raise ValueError(f"new {which} embeddings must have weight shape {tuple(shape)} (padded vocab, n_embd), got "
                         f"{got or type(module).__name__}: lm_head and the value embeddings are vocab-sized too, so "
                         f"use resize_token_embeddings(n) to change the vocabulary")


class CognicaPoEPreTrainedModel(PreTrainedModel):
    config_class = CognicaPoEConfig
    base_model_prefix = "gpt"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True  # the blocks (model.Block) recompute in backward when enabled
    accepts_loss_kwargs = True  # forward honours num_items_in_batch (Trainer's gradient accumulation)
    _no_split_modules = ["Block"]
    _supports_sdpa = True
    _supports_attention_backend = False

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, GPT):
            module.init_weights()  # guarded init: tensors loaded from a checkpoint are left alone


class CognicaPoEForCausalLM(CognicaPoEPreTrainedModel, GenerationMixin):
    def __init__(self, config: CognicaPoEConfig):
        super().__init__(config)
        self.gpt = GPT(config)
        self.post_init()

    # -----------------------------------------------------------------------------
    # transformers plumbing

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """
        transformers' loader, after checking a local folder's weights tensor by tensor (errors name the keys).
        device_map places the stages ({"stage:0": "cuda:0", ...}, "auto" or one device: placement.py), not
        transformers' per-module map: the layer loop moves only the residual stream between stages.
        """
        device_map = kwargs.pop("device_map", None)
        if device_map is not None:
            model = cls.from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            place_device_map(model.gpt, device_map)
            return model
        path = str(pretrained_model_name_or_path)
        weights = os.path.join(path, "model.safetensors")
        if os.path.isfile(os.path.join(path, "quantization.json")):  # quantize.py's layout, not transformers'
            raise ValueError(f"{path} is a quantized folder (int8/int4 weights, quantization.json): load it with "
                             "cognica_poe.load_model; it cannot be trained, fine-tuned or loaded by transformers")
        if is_stage_folder(path):
            # a specialist stage folder: assemble it on its parents (parent_map= maps repo ids to folders)
            dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
            dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
            return load_folder(path, kwargs.get("parent_map"), None if dtype == "auto" else dtype)
        if os.path.isfile(weights):
            config = kwargs.get("config")
            if not isinstance(config, CognicaPoEConfig):
                config = CognicaPoEConfig.from_pretrained(path)
            with torch.device("meta"):
                expected = expected_shapes(GPT(config))
            raw = safetensors_shapes(weights)
            check_shapes(expected, {strip_prefixes(k): v for k, v in raw.items()}, weights)
            prefixes = {k[: len(k) - len(strip_prefixes(k))] for k in raw}
            if prefixes != {"gpt."} and "key_mapping" not in kwargs:  # map any accepted prefix onto ".gpt"
                kwargs["key_mapping"] = {r"^(?:_orig_mod\.|gpt\.|model\.)*": "gpt."}
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # safetensors weights arrive memory-mapped at arbitrary alignment, which sends CPU matmuls down other SIMD
        # paths (last-bit differences); owned, aligned copies make a loaded model compute exactly as it was saved
        with torch.no_grad():
            for p in model.parameters():
                if p.device.type != "meta":
                    p.data = p.data.clone()
        return model

    @classmethod
    def from_gpt(cls, gpt: GPT) -> "CognicaPoEForCausalLM":
        """The transformers face of a core GPT (sharing its config and every tensor; nothing is copied)."""
        with torch.device("meta"):
            model = cls(gpt.config)
        model.gpt = gpt
        return model.train(gpt.training)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.gpt.transformer.wte

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.gpt.lm_head

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace wte by a module of the same (padded vocab, n_embd) shape (resize_token_embeddings: a new vocab)."""
        check_vocab_shape("input", value, self.gpt.transformer.wte.weight.shape)
        self.gpt.transformer.wte = value

    def set_output_embeddings(self, value: nn.Module) -> None:
        """Replace lm_head by a module of the same (padded vocab, n_embd) shape."""
        check_vocab_shape("output", value, self.gpt.lm_head.weight.shape)
        self.gpt.lm_head = value

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Module:
        """
        Change the vocabulary to new_num_tokens tokens. Every vocab-sized matrix changes together (wte, lm_head, the
        value embeddings and a specialist's stage heads), each padded to config.padded_vocab_size rows
        (pad_to_multiple_of replaces config.pad_vocab_size_to); config.vocab_size becomes new_num_tokens, and so
        does the width of the logits. Existing tokens keep their rows; a new token's rows start at the mean of
        the existing tokens' rows (mean_resizing=False: at zero). Returns the input embedding.
        """
        cfg, gpt = self.config, self.gpt
        if new_num_tokens is None and pad_to_multiple_of is None:
            return gpt.transformer.wte
        vocab = cfg.vocab_size if new_num_tokens is None else new_num_tokens
        pad_to = cfg.pad_vocab_size_to if pad_to_multiple_of is None else pad_to_multiple_of
        for name, value in (("new_num_tokens", vocab), ("pad_to_multiple_of", pad_to)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            ids = getattr(cfg, name)
            for i in ids if isinstance(ids, list) else [ids]:
                if i is not None and i >= vocab:
                    raise ValueError(f"{name} {i} would be outside a vocabulary of {vocab} tokens: keep at least "
                                     f"{i + 1} tokens, or change config.{name} first")
        old_vocab = cfg.vocab_size
        padded = -(-vocab // pad_to) * pad_to
        gpt.unpack_weights()  # packed copies belong to the old matrices
        matrices = [gpt.transformer.wte, gpt.lm_head, *gpt.value_embeds.values()]
        if cfg.specialist_ends:
            matrices += [gpt.lm_head_stage, *gpt.ancestor_heads.values()]
        with torch.no_grad():
            for m in matrices:  # rows are tokens in every one: Embedding (V, dim), Linear weight (V, n_embd)
                w = m.weight
                keep = min(old_vocab, vocab)
                fill = w[:old_vocab].float().mean(dim=0) if mean_resizing else torch.zeros(w.size(1))
                rows = fill.to(w.dtype).to(w.device).expand(padded, -1).clone()
                rows[:keep] = w[:keep]
                m.weight = nn.Parameter(rows, requires_grad=w.requires_grad)
                if isinstance(m, nn.Embedding):
                    m.num_embeddings = padded
                else:
                    m.out_features = padded
        cfg.vocab_size, cfg.pad_vocab_size_to = vocab, pad_to
        return gpt.transformer.wte

    def pack_weights(self) -> int:
        """
        CPU inference: prepacked copies of the large matrices (GPT.pack_weights); returns how many. Packed matrices are
        packed.Linear, which torch.ao's quantize_dynamic (exact types) would skip: quantize an unpacked model.
        """
        return self.gpt.pack_weights()

    def unpack_weights(self) -> None:
        self.gpt.unpack_weights()

    def new_cache(self, batch_size: int, max_len: int | None = None, keep_hidden: bool = False) -> CognicaKVCache:
        """An empty KV cache for this model's dtype and device (keep_hidden: also keep stage-boundary streams)."""
        return self.gpt.new_cache(batch_size, max_len, keep_hidden)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length, *args, **kwargs) -> None:
        """
        generate() always decodes with our preallocated CognicaKVCache (never a DynamicCache). batch_size is the
        caller's batch; transformers has already repeated every row num_beams / num_return_sequences times.
        """
        user_cache = model_kwargs.get(_CACHE_FIELD)
        if user_cache is not None:
            if not isinstance(user_cache, CognicaKVCache):
                raise TypeError(f"this model needs a CognicaKVCache, got {type(user_cache).__name__}")
            return
        if generation_config.use_cache is False:
            return
        expand = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
        model_kwargs[_CACHE_FIELD] = self.new_cache(batch_size * expand, max_cache_length + 1)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        cache = kwargs.pop(_CACHE_FIELD, None)
        if cache is not None and cache.n_slots > 0:
            input_ids = input_ids[:, cache.n_slots:]  # decode: feed only the tokens the cache has not seen
        kwargs.pop("position_ids", None)  # positions come from the attention mask
        kwargs.pop("cache_position", None)
        return {"input_ids": input_ids, "attention_mask": attention_mask, _CACHE_FIELD: cache, **{
            k: v for k, v in kwargs.items()
            if k in ("use_cache", "logits_to_keep", "labels", "output_hidden_states", "output_attentions")}}

    def _prepare_attention_mask_for_generation(self, inputs_tensor, generation_config, model_kwargs):
        """Never guess a mask from pad ids when the pad token is BOS: every prompt starts with BOS."""
        pad = generation_config.pad_token_id
        if pad is not None and pad == self.config.bos_token_id:
            return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)
        return super()._prepare_attention_mask_for_generation(inputs_tensor, generation_config, model_kwargs)

    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            warn_if_missing_bos(ids, kwargs.get("attention_mask"), self.config.bos_token_id)
        return super().generate(inputs, **kwargs)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                cache: CognicaKVCache | None = None, past_key_values: CognicaKVCache | None = None,
                use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int = 0, num_items_in_batch: int | torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                output_attentions: bool | None = None, return_dict: bool | None = None,
                **kwargs) -> CausalLMOutputWithPast | tuple:
        """
        Full-depth logits (B, T, vocab) in fp32. With a cache, input_ids are the new tokens and attention_mask
        covers past + new (as generate() passes it) or just the new tokens. labels are shifted inside, HF-style.
        num_items_in_batch (the Trainer passes it under gradient accumulation): the loss is the token sum divided
        by it, so micro-batches add up to the mean over the whole accumulated batch.

        output_hidden_states: hidden_states[0] is the embedding after smear (the x0 every layer blends in) and
        hidden_states[i + 1] the stream after layer i, full length, for the layers that run (all of them unless
        config.poe_exit_stage is set). Stage exits read them: the exit at boundary layer b (not the last) is
        gpt.exit_logits(hidden_states[b + 1], b); the last exit first subtracts backout:
        hidden_states[-1] - gpt.backout_lambda * hidden_states[config.backout_layer + 1].
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds is not supported: this model looks every token up by id (value "
                             "embeddings, smear), so pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if output_attentions:
            raise ValueError("output_attentions is not supported: attention runs in fused kernels that return no "
                             "attention weights")
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = self.new_cache(input_ids.size(0), max(input_ids.size(1), self.config.sequence_len))
        keep = 0 if labels is not None else int(logits_to_keep)
        streams = [] if output_hidden_states else None
        logits = self.gpt(input_ids, kv_cache=cache, attention_mask=attention_mask, logits_to_keep=keep,
                          streams=streams)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
            shift_labels = labels[:, 1:].reshape(-1).to(shift_logits.device)
            if num_items_in_batch is None:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
            else:
                loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
                loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        hidden_states = None if streams is None else tuple(streams)
        out = CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=hidden_states, **{_CACHE_FIELD: cache})
        return out if (return_dict if return_dict is not None else self.config.return_dict) else out.to_tuple()

    # -----------------------------------------------------------------------------
    # the PoE stage API

    @property
    def poe_n_stages(self) -> int:
        return self.config.poe_n_stages

    @property
    def poe_stage_boundary_layers(self) -> list[int]:
        return self.config.poe_stage_boundary_layers

    def stage_boundary(self, stage: int) -> int:
        """Last layer of `stage` (0-based); a clear error for a bad index."""
        return self.config.stage_boundary(stage)

    @torch.no_grad()
    def forward_stage(self, input_ids: torch.LongTensor, stage: int, attention_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """Logits (B, T, vocab) of stage exit `stage`, running only the layers up to its boundary."""
        boundary = self.stage_boundary(stage)
        return self.gpt.forward_all_stages(input_ids, [boundary], attention_mask=attention_mask)[0]

    # the stage-level inference modes: each lives in its own file and works on the core GPT

    def generate_stage(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Prefix pruning: decode from the exit of `stage`, running only its layers (prefix.generate_stage)."""
        return generate_stage(self.gpt, input_ids, *args, **kwargs)

    def generate_wand(self, input_ids: torch.Tensor, *args, **kwargs):
        """WAND adaptive depth: each token from the first exit that cannot be overturned (wand.generate_wand)."""
        return generate_wand(self.gpt, input_ids, *args, **kwargs)

    def generate_speculative(self, input_ids: torch.Tensor, *args, **kwargs):
        """Self-speculative decoding: an early exit drafts, the full model verifies (speculative.py)."""
        return generate_speculative(self.gpt, input_ids, *args, **kwargs)

    def generate_parallel_composition(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Log-OP of the chosen stage exits (compose.generate_parallel_composition)."""
        return generate_parallel_composition(self.gpt, input_ids, *args, **kwargs)


def load_base_gpt(path: str, dtype: torch.dtype | None) -> GPT:
    """A base folder's core GPT, through transformers' loader (its tensor-by-tensor checks included)."""
    return CognicaPoEForCausalLM.from_pretrained(path, **({} if dtype is None else {"dtype": dtype})).gpt


def load_folder(path: str, parent_map: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                load_base: Callable[[str, torch.dtype | None], GPT] = load_base_gpt,
                device_map=None) -> CognicaPoEForCausalLM:
    """
    The one loader of a model folder, in eval mode: a base folder, or a stage folder assembled on its ancestors
    (parents resolve offline: specialist.resolve_parent; parent_map maps repo ids to folders). device_map: where
    the stages run (placement.py).
    """
    if is_stage_folder(path):
        model = CognicaPoEForCausalLM.from_gpt(load_stage_folder(path, load_base, parent_map, dtype)).eval()
    else:
        model = CognicaPoEForCausalLM.from_pretrained(path, **({} if dtype is None else {"dtype": dtype})).eval()
    if device_map is not None:
        place_device_map(model.gpt, device_map)
    return model
