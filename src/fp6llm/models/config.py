"""ModelConfig: the shape of a decoder as data, from a Hugging Face config.json or by name (NAMED_CONFIGS)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

ARCHS = ("llama", "opt", "gemma3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # Gemma-3: global attention, or local within sliding_window
ACTIVATIONS = ("silu", "relu", "gelu", "gelu_tanh")
ROPE_TYPES = ("default", "linear", "llama3")
OPT_POSITION_OFFSET = 2  # OPT's learned position table starts 2 rows in (a relic of fairseq's padding index)
# Bounds on a config's sizes (a checkpoint is untrusted input: 10**6 layers would build modules for hours). Each is
# well past every released model's (Llama 3.1 405B: 126 layers, dim 16384, ffn 53248; vocabularies ~256k).
SIZE_LIMITS = {"vocab_size": 2**22, "dim": 2**16, "n_layers": 1024, "n_heads": 2**10, "n_kv_heads": 2**10,
               "head_dim": 2**12, "intermediate_size": 2**20, "max_position_embeddings": 2**24,
               "word_embed_proj_dim": 2**16, "sliding_window": 2**24}
REQUIRED_SIZES = ("vocab_size", "dim", "n_layers", "n_heads", "intermediate_size", "max_position_embeddings")
# The same fields by their names in a Hugging Face config.json, for error messages that name what the file says.
HF_NAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "eos_token_ids": "eos_token_id"}


@dataclass
class ModelConfig:
    """Everything the model files need to build a decoder; no training-only fields.

    arch "llama" covers Llama 2/3, Mistral and Qwen2 (RMSNorm, RoPE, GQA, SwiGLU); "opt" covers OPT (LayerNorm,
    learned positions, ReLU MLP, biases everywhere); "gemma3" Gemma-3's text decoder (llama's pieces plus four
    norms a layer, q/k norms, GeGLU, and local layers beside global ones).
    """

    arch: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    intermediate_size: int
    n_kv_heads: Optional[int] = None  # None: n_heads (no GQA)
    head_dim: Optional[int] = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    activation: str = "silu"
    tie_word_embeddings: bool = False
    # RoPE (llama)
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...} or "linear"
    sliding_window: Optional[int] = None  # Mistral: a query sees only the last sliding_window keys
    # biases (llama family: Qwen2 has q/k/v biases; OPT has them all)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Gemma-3: each layer's kind (LAYER_TYPES; its sliding layers alone have sliding_window, and turn by
    # local_rope_theta (None: rope_theta), unscaled), the query scale's denominator (None: head_dim), the cap of
    # the logits' tanh soft-capping (None: none)
    layer_types: tuple = ()
    local_rope_theta: Optional[float] = None
    query_pre_attn_scalar: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    # OPT
    do_layer_norm_before: bool = True  # False: post-LN (OPT-350m)
    final_layer_norm: bool = True
    word_embed_proj_dim: Optional[int] = None  # None: dim; else project_in / project_out around the layers
    position_offset: int = 0
    # token ids the engine stops on (from config.json / generation_config.json when loading)
    eos_token_ids: tuple = field(default_factory=tuple)

    def __post_init__(self):
        for name, limit in SIZE_LIMITS.items():  # None: a default filled in below
            value = getattr(self, name)
            if (value is not None or name in REQUIRED_SIZES) and not (type(value) is int and 1 <= value <= limit):
                raise ValueError(f"{name}={value!r} is not an integer in 1..{limit}")
        for name in ("norm_eps", "rope_theta", "local_rope_theta", "query_pre_attn_scalar", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is None and name not in ("norm_eps", "rope_theta"):
                continue
            if type(value) not in (int, float) or not 0 < value < float("inf"):
                raise ValueError(f"{name}={value!r} is not a finite number > 0")
        if not all(type(i) is int and i >= 0 for i in self.eos_token_ids):
            raise ValueError(f"eos_token_ids={self.eos_token_ids!r} are not token ids")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; supported: {', '.join(ARCHS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unsupported activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.dim // self.n_heads
        self.word_embed_proj_dim = self.word_embed_proj_dim or self.dim
        self.eos_token_ids = tuple(self.eos_token_ids)
        self.layer_types = tuple(self.layer_types)
        if self.arch == "gemma3" and (len(self.layer_types) != self.n_layers
                                      or not set(self.layer_types) <= set(LAYER_TYPES)):
            raise ValueError(f"layer_types={list(self.layer_types)!r} must name {self.n_layers} layers, each one of "
                             f"{', '.join(LAYER_TYPES)}")
        if self.arch == "gemma3" and "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("sliding_window=None, but layer_types has sliding_attention layers")
        if self.head_dim < 1:
            raise ValueError(f"head_dim={self.head_dim}: dim={self.dim} is smaller than n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling {rope_type!r}; supported: {', '.join(ROPE_TYPES)}")

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        if name not in NAMED_CONFIGS:
            raise ValueError(f"unknown model name {name!r}; named configs: {', '.join(NAMED_CONFIGS)}")
        return cls(**NAMED_CONFIGS[name])

    @classmethod
    def from_dict(cls, values: dict, where: str = "the config") -> "ModelConfig":
        """Inverse of ``dataclasses.asdict`` (as stored in fp6llm.json). Raises ValueError naming ``where`` (the
        file) and the field for unknown or missing fields and for out-of-range values."""
        if not isinstance(values, dict):
            raise ValueError(f"{where}: the config must be a JSON object, got {type(values).__name__}")
        fields = dataclasses.fields(cls)
        unknown = set(values) - {f.name for f in fields}
        if unknown:
            raise ValueError(f"{where}: unknown ModelConfig field(s): {', '.join(sorted(unknown))}")
        required = dataclasses.MISSING
        missing = [f.name for f in fields if f.default is required and f.default_factory is required
                   and f.name not in values]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        try:
            return cls(**values)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{where}: {err}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "ModelConfig":
        """From a Hugging Face config.json (as a dict): model_type llama, mistral, qwen2, opt, gemma3_text, or gemma3
        (the multimodal model's text_config; eos ids and tied embeddings from the outer config where it has them).

        Accepts both spellings of RoPE settings: transformers 4.x (rope_theta + rope_scaling with "type" or
        "rope_type") and 5.x (rope_parameters). Raises ValueError for another model_type (naming it) or for a
        feature the model files do not implement (naming it), and for a missing field or an out-of-range value
        (naming ``where``, the file, and the field as the file spells it).
        """
        if not isinstance(hf, dict):
            raise ValueError(f"{where}: must be a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type == "gemma3":  # the multimodal model: its text decoder alone (the vision tower is not loaded)
            if not isinstance(hf.get("text_config"), dict):
                raise ValueError(f"{where}: model_type 'gemma3' needs a text_config object")
            outer = {key: hf[key] for key in ("eos_token_id", "tie_word_embeddings") if hf.get(key) is not None}
            hf, where = {**hf["text_config"], **outer, "model_type": "gemma3_text"}, f"{where}: text_config"
            model_type = "gemma3_text"
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r} in {where}; supported: "
                             f"{', '.join(HF_MODEL_TYPES)}, gemma3")
        missing = [key for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "max_position_embeddings", "ffn_dim" if model_type == "opt" else
                                   "intermediate_size") if key not in hf]
        if missing:
            raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
        eos = hf.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        common = dict(vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
                      n_heads=hf["num_attention_heads"], max_position_embeddings=hf["max_position_embeddings"],
                      eos_token_ids=eos)
        hf_names = {**HF_NAMES, "intermediate_size": "ffn_dim" if model_type == "opt" else "intermediate_size"}
        try:
            fields = (_opt_fields(hf) if model_type == "opt" else _gemma3_fields(hf) if model_type == "gemma3_text"
                      else _llama_fields(hf, model_type))
            return cls(**common, **fields)
        except (ValueError, TypeError, AttributeError) as err:  # a field's value: say it as config.json names it
            field, equals, rest = str(err).partition("=")
            message = f"{hf_names.get(field, field)}={rest}" if equals and " " not in field else str(err)
            raise ValueError(f"{where}: {message}") from None


def _rope_fields(hf: dict) -> dict:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"  # 4.x wrote "type"
    params.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling {rope_type!r} in config.json; supported: {', '.join(ROPE_TYPES)}")
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported")
    scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
    return dict(rope_theta=float(theta), rope_scaling=scaling)


def _llama_fields(hf: dict, model_type: str) -> dict:
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("Qwen2 with use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported for {model_type} (only silu)")
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        arch="llama", n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), activation="silu",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)), **_rope_fields(hf),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        qkv_bias=model_type == "qwen2" or attention_bias, o_bias=attention_bias, mlp_bias=bool(hf.get("mlp_bias")))


def _gemma3_fields(hf: dict) -> dict:
    """Gemma-3's fields; transformers' defaults (Gemma3TextConfig) for the ones a config.json may leave out."""
    activation = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"hidden_activation {activation!r} is not supported for gemma3 (only gelu_pytorch_tanh)")
    if hf.get("attn_logit_softcapping") is not None:  # transformers 5 ignores it too; the paged attention has none
        raise ValueError(f"attn_logit_softcapping={hf['attn_logit_softcapping']} is not supported (only null)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("gemma3 with use_bidirectional_attention=true is not supported (a decoder is causal)")
    layers = hf["num_hidden_layers"]
    pattern = hf.get("sliding_window_pattern", 6)  # the layer types of configs written before layer_types
    layer_types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                            for i in range(layers)]
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers 5: one entry per layer type
        rope = _rope_fields({**hf, "rope_parameters": params["full_attention"]})
        local = dict(params.get("sliding_attention") or {})
        if (local.get("rope_type") or "default") != "default":
            raise ValueError(f"rope_type {local['rope_type']!r} of the sliding layers is not supported (only default)")
        local_theta = local.get("rope_theta", 10000.0)
    else:  # transformers 4.x: rope_theta and rope_scaling of the global layers, rope_local_base_freq
        rope = _rope_fields({"rope_theta": 1000000.0, **hf})
        local_theta = hf.get("rope_local_base_freq", 10000.0)
    attention_bias = bool(hf.get("attention_bias", False))
    return dict(
        arch="gemma3", n_kv_heads=hf.get("num_key_value_heads"), head_dim=hf.get("head_dim"),
        intermediate_size=hf["intermediate_size"], norm_eps=hf.get("rms_norm_eps", 1e-6), activation="gelu_tanh",
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), **rope, local_rope_theta=float(local_theta),
        sliding_window=hf.get("sliding_window", 4096), layer_types=tuple(layer_types),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        final_logit_softcapping=hf.get("final_logit_softcapping"), qkv_bias=attention_bias, o_bias=attention_bias)


def _opt_fields(hf: dict) -> dict:
    if not hf.get("layer_norm_elementwise_affine", True):
        raise ValueError("OPT with layer_norm_elementwise_affine=false is not supported")
    activation = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh"}.get(hf.get("activation_function", "relu"))
    if activation is None:
        raise ValueError(f"OPT activation_function {hf['activation_function']!r} is not supported")
    bias = bool(hf.get("enable_bias", True))
    return dict(
        arch="opt", intermediate_size=hf["ffn_dim"], activation=activation, norm_eps=1e-5,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=bias, o_bias=bias, mlp_bias=bias,
        do_layer_norm_before=bool(hf.get("do_layer_norm_before", True)),
        final_layer_norm=bool(hf.get("do_layer_norm_before", True)) and not hf.get("_remove_final_layer_norm", False),
        word_embed_proj_dim=hf.get("word_embed_proj_dim"), position_offset=OPT_POSITION_OFFSET)


HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "opt", "gemma3_text")

_LLAMA2 = dict(arch="llama", vocab_size=32000, max_position_embeddings=4096, eos_token_ids=(2,))
_OPT = dict(arch="opt", vocab_size=50272, max_position_embeddings=2048, activation="relu", tie_word_embeddings=True,
            qkv_bias=True, o_bias=True, mlp_bias=True, position_offset=OPT_POSITION_OFFSET, eos_token_ids=(2,))
_GEMMA3 = dict(arch="gemma3", norm_eps=1e-6, activation="gelu_tanh", tie_word_embeddings=True, rope_theta=1000000.0,
               local_rope_theta=10000.0, eos_token_ids=(1, 106))

# Real sizes for --random (the weights are random; the shapes and the bytes are the real models').
NAMED_CONFIGS = {
    "llama-2-7b": dict(_LLAMA2, dim=4096, n_layers=32, n_heads=32, intermediate_size=11008),
    "llama-2-13b": dict(_LLAMA2, dim=5120, n_layers=40, n_heads=40, intermediate_size=13824),
    "llama-2-70b": dict(_LLAMA2, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, intermediate_size=28672),
    "llama-3-8b": dict(arch="llama", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                       intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=8192,
                       eos_token_ids=(128001, 128009)),
    "opt-30b": dict(_OPT, dim=7168, n_layers=48, n_heads=56, intermediate_size=28672),
    "gemma-3-270m": dict(_GEMMA3, vocab_size=262144, dim=640, n_layers=18, n_heads=4, n_kv_heads=1, head_dim=256,
                         intermediate_size=2048, max_position_embeddings=32768, sliding_window=512,
                         query_pre_attn_scalar=256,
                         layer_types=(("sliding_attention",) * 5 + ("full_attention",)) * 3),
    # Tiny shapes for tests and demos: a second or so on a CPU.
    "tiny-llama": dict(arch="llama", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       intermediate_size=128, max_position_embeddings=512, eos_token_ids=(2,)),
    "tiny-opt": dict(_OPT, vocab_size=512, dim=64, n_layers=2, n_heads=4, intermediate_size=128,
                     max_position_embeddings=512),
    "tiny-gemma3": dict(_GEMMA3, vocab_size=512, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16,
                        intermediate_size=128, max_position_embeddings=512, sliding_window=8, query_pre_attn_scalar=16,
                        layer_types=("sliding_attention", "sliding_attention", "full_attention")),
}
