"""
The one configuration of a Cognica PoE model, and the named presets.

`CognicaPoEConfig` is a transformers `PretrainedConfig` (model_type "cognica_poe") that the core GPT reads
directly, so there is exactly one config object from training to `from_pretrained`. Field names follow
nanochat's GPTConfig (sequence_len, n_layer, n_head, n_kv_head, n_embd, window_pattern) plus the PoE fields
(poe_mode, poe_every, poe_alpha) and the quantities nanochat hard-codes, written down here so a checkpoint
says what it is. Everything derived (head_dim, padded vocab, window sizes, value-embedding layers, stage
boundaries, backout layer) is a method here, so no other file recomputes it.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import math
import numbers

from transformers import PretrainedConfig

from .presets import PRESETS

POE_MODES = ("flat", "hier", "none")
# a config.json must say what model it describes; every other field has the documented default below
REQUIRED_FIELDS = ("vocab_size", "sequence_len", "n_layer", "n_head", "n_embd", "poe_every")


def is_int(value) -> bool:
    """An integer of any kind (Python, numpy) that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class CognicaPoEConfig(PretrainedConfig):
    """
    A config.json (or dict) must give REQUIRED_FIELDS; n_kv_head defaults to n_head (plain multi-head
    attention) and every other field to the constructor's default. The constructor itself keeps defaults for
    all fields, because transformers builds `CognicaPoEConfig()` internally (to diff a config against defaults).
    """

    model_type = "cognica_poe"
    # transformers' generic code (caches, generation, device maps) asks for these standard names
    attribute_map = {
        "hidden_size": "n_embd",
        "num_hidden_layers": "n_layer",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_kv_head",
        "max_position_embeddings": "sequence_len",
    }

    def __init__(
        self,
        vocab_size: int = 32768,
        sequence_len: int = 2048,
        n_layer: int = 24,
        n_head: int = 12,
        n_kv_head: int = 12,
        n_embd: int = 1536,
        window_pattern: str = "SSSL",
        rope_theta: float = 100000.0,
        rotary_multiplier: int = 10,
        softcap: float = 15.0,
        qk_scale: float = 1.2,
        pad_vocab_size_to: int = 64,
        poe_mode: str = "flat",
        poe_every: int = 6,
        poe_alpha: float = 0.0,
        wand_p99_bounds: list[float] | None = None,
        base_n_layer: int | None = None,
        specialist_ends: list[int] | None = None,
        head_mode: str = "dual",
        base_model_name_or_path: str | None = None,
        poe_exit_stage: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.sequence_len = sequence_len
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.n_embd = n_embd
        self.window_pattern = window_pattern
        self.rope_theta = rope_theta
        self.rotary_multiplier = rotary_multiplier
        self.softcap = softcap
        self.qk_scale = qk_scale
        self.pad_vocab_size_to = pad_vocab_size_to
        self.poe_mode = poe_mode
        self.poe_every = poe_every
        self.poe_alpha = poe_alpha
        # a string is not a list of bounds (list("1,2") would be characters): validate_shape refuses it
        self.wand_p99_bounds = list(wand_p99_bounds) if isinstance(wand_p99_bounds, list | tuple) else wand_p99_bounds
        # layers of the original base model (window layout, value embeddings and backout follow the base;
        # specialist stages append layers after it). None means "this model is its own base".
        self.base_n_layer = base_n_layer
        # specialist stages appended after the base: the last layer of each, ancestors first, the leaf last
        self.specialist_ends = list(specialist_ends) if specialist_ends else None
        self.head_mode = head_mode  # the leaf's exit: "dual" lm_head + lm_head_stage, "base" lm_head, "spec" stage
        self.base_model_name_or_path = base_model_name_or_path  # a stage folder's parent (path or repo id)
        # the stage whose exit forward()/generate() serve (0-based, negative from the end); None: the normal exit.
        # Lets `lm_eval --model_args ...,poe_exit_stage=1` (a from_pretrained kwarg) evaluate one stage.
        self.poe_exit_stage = poe_exit_stage
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.validate_shape()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "CognicaPoEConfig":
        """Every load of a config.json comes here: a missing required field is an error naming it, not a default."""
        if not isinstance(config_dict, dict):
            raise ValueError(f"a config must be a JSON object of fields, got {type(config_dict).__name__}")
        given = {**config_dict, **kwargs}
        missing = [name for name in REQUIRED_FIELDS if name not in given]
        if missing:
            raise ValueError(f"config.json lacks the required field {missing[0]} (required: "
                             f"{', '.join(REQUIRED_FIELDS)}); write it into the file")
        if "n_kv_head" not in given:
            config_dict = {**config_dict, "n_kv_head": given["n_head"]}
        return super().from_dict(config_dict, **kwargs)

    # -----------------------------------------------------------------------------
    # validation

    def validate_shape(self) -> None:
        """Raise a ValueError naming the offending field when the numbers cannot describe a model."""
        for name in ("vocab_size", "sequence_len", "n_layer", "n_head", "n_kv_head", "n_embd", "poe_every",
                     "rotary_multiplier", "pad_vocab_size_to"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("rope_theta", "softcap", "qk_scale", "poe_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
        bounds = self.wand_p99_bounds
        if bounds is not None and not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds):
            raise ValueError(f"wand_p99_bounds must be a list of numbers, got {bounds!r}")
        if not isinstance(self.window_pattern, str):
            raise ValueError(f"window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        pattern = self.window_pattern.upper()
        if not pattern or any(c not in "SL" for c in pattern):
            raise ValueError(f"window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")
        if self.poe_mode not in POE_MODES:
            raise ValueError(f"poe_mode must be one of {POE_MODES}, got {self.poe_mode!r}")
        if self.base_n_layer is not None and not (0 < self.base_n_layer <= self.n_layer):
            raise ValueError(f"base_n_layer ({self.base_n_layer}) must be in 1..n_layer ({self.n_layer})")
        if self.head_mode not in ("dual", "base", "spec"):
            raise ValueError(f"head_mode must be dual, base or spec, got {self.head_mode!r}")
        if self.specialist_ends:
            ends = self.specialist_ends
            if self.base_n_layer is None or ends != sorted(set(ends)) or ends[0] < self.base_n_layer \
                    or ends[-1] != self.n_layer - 1:
                raise ValueError(f"specialist_ends {ends} must increase from base_n_layer ({self.base_n_layer}) "
                                 f"to the last layer ({self.n_layer - 1})")
        self.validate_exit_stage()

    def validate_exit_stage(self) -> None:
        """Checked again at serve time: from_pretrained(..., poe_exit_stage=s) sets the field after __init__."""
        if self.poe_exit_stage is not None:
            self.stage_boundary(self.poe_exit_stage, "poe_exit_stage")

    def stage_boundary(self, stage: int, name: str = "stage") -> int:
        """
        Last layer of `stage` (0-based, negative from the end): the one range check of a stage index, so every
        mode, the config's poe_exit_stage and the transformers face fail alike. name: the argument's name.
        """
        n = self.poe_n_stages
        if not is_int(stage) or not -n <= stage < n:  # Python or numpy integers; never a bool
            raise ValueError(f"{name} {stage!r} out of range: this model has {n} stages, 0..{n - 1} (or -{n}..-1 "
                             f"from the end; boundaries {self.poe_stage_boundary_layers})")
        return self.poe_stage_boundary_layers[int(stage)]

    def check_exit_layers(self, exits: list[int]) -> list[int]:
        """Exit layers (0-based layer indices, as GPT.hidden_at_exits takes them) as ints; a clear error for none or
        one outside the model."""
        n = self.n_layer
        exits = [int(e) for e in exits]
        if not exits:
            raise ValueError("at least one exit layer is needed")
        bad = [e for e in exits if not 0 <= e < n]
        if bad:
            raise ValueError(f"exit layer(s) {bad} out of range: this model has layers 0..{n - 1} "
                             f"(stage boundaries {self.poe_stage_boundary_layers})")
        return exits

    # -----------------------------------------------------------------------------
    # derived quantities (nanochat hard-codes these; we compute them in one place)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_to
        return ((self.vocab_size + m - 1) // m) * m

    @property
    def rotary_seq_len(self) -> int:
        return self.rotary_multiplier * self.sequence_len

    @property
    def trunk_n_layer(self) -> int:
        """Layers of the base trunk, which own the window layout, value embeddings and backout point."""
        return self.base_n_layer if self.base_n_layer is not None else self.n_layer

    @property
    def backout_layer(self) -> int:
        return self.trunk_n_layer // 2

    def has_value_embed(self, layer: int) -> bool:
        """Alternating layers ending with the base's last layer carry value embeddings (none on new layers)."""
        n = self.trunk_n_layer
        return layer < n and layer % 2 == (n - 1) % 2

    def window_sizes(self) -> list[int]:
        """
        Per-layer attention window: a query at t sees keys [t - window, t]. The base keeps its own layout (the
        pattern tiled, its last layer long); each appended specialist continues the pattern and ends long.
        """
        long_window = self.sequence_len
        short_window = math.ceil(self.sequence_len / 4 / 128) * 128
        pattern = self.window_pattern.upper()
        sizes = []
        for first, last in self.segments():
            seg = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(first, last + 1)]
            seg[-1] = long_window
            sizes += seg
        return sizes

    def segments(self) -> list[tuple[int, int]]:
        """(first, last) layer of the base and of every appended specialist."""
        ends = [self.trunk_n_layer - 1] + (self.specialist_ends or [])
        return [(a + 1, b) for a, b in zip([-1] + ends[:-1], ends)]

    @property
    def poe_stage_boundary_layers(self) -> list[int]:
        """0-based index of the last layer of each stage: the base's stages, then one per specialist."""
        n = self.trunk_n_layer
        return [k - 1 for k in range(self.poe_every, n, self.poe_every)] + [n - 1] + (self.specialist_ends or [])

    def stage_layers(self) -> list[range]:
        """The layers of every stage, in order (stage k ends at poe_stage_boundary_layers[k])."""
        bounds = self.poe_stage_boundary_layers
        return [range(a + 1, b + 1) for a, b in zip([-1] + bounds[:-1], bounds)]

    @property
    def poe_n_stages(self) -> int:
        return len(self.poe_stage_boundary_layers)


# -----------------------------------------------------------------------------
# presets (presets.py)

def preset_config(name: str, **overrides) -> CognicaPoEConfig:
    """A config from a preset name, with keyword overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return CognicaPoEConfig(**{**PRESETS[name], **overrides})
