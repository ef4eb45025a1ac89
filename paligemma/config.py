"""PaliGemma configuration: three dataclasses parsed from the hub's `config.json`.

The hub files are terse: google/paligemma-3b-pt-224 names only a few fields per tower and relies on
the defaults of transformers' config classes for the rest. Those defaults are written here, once:
as dataclass defaults (Gemma 1 and SigLIP) and in `GEMMA2_DEFAULTS` for PaliGemma 2's decoder.
Fields that fix a tower's size are required: silently defaulting them would build the wrong model.
"""
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    pass


IGNORE = -100  # the label of positions the loss skips (transformers' convention): the processor writes it, the loss reads it


@dataclass
class VisionConfig:  # SigLIP So400m/14 in every released PaliGemma
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224  # 224, 448 or 896 in the released checkpoints
    patch_size: int = 16  # SigLIP's own default; PaliGemma's hub files say 14
    layer_norm_eps: float = 1e-6

    @property
    def num_patches(self) -> int:  # = number of image tokens the decoder sees
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TextConfig:  # Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2)
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    model_type: str = "gemma"  # "gemma" or "gemma2": switches on the Gemma 2 quirks below
    vocab_size: int = 256000  # PaliGemma stores 257,216 rows (tokenizer has 257,152 + <image>)
    num_attention_heads: int = 16
    num_key_value_heads: int = 16  # 1 in PaliGemma 1 (multi-query), 4 in PaliGemma 2 3B (grouped)
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Gemma 2 only (None / [] = off, which is Gemma 1):
    query_pre_attn_scalar: float | None = None  # softmax scale is query_pre_attn_scalar**-0.5, not head_dim**-0.5
    attn_logit_softcapping: float | None = None  # tanh soft cap on attention scores (50 in Gemma 2)
    final_logit_softcapping: float | None = None  # tanh soft cap on output logits (30 in Gemma 2)
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # per layer "sliding_attention" / "full_attention"
    sandwich_norms: bool = False  # Gemma 2 adds post-attention and pre/post-feed-forward norms

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == "sliding_attention"


# Gemma2Config's defaults for what PaliGemma 2's hub files leave out.
GEMMA2_DEFAULTS = dict(
    vocab_size=256000, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
    query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
    sliding_window=4096, sandwich_norms=True,
)

# The gelu variants transformers maps onto the tanh approximation Gemma and SigLIP were trained with.
_TANH_GELUS = {"gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu"}


@dataclass
class PaliGemmaConfig:
    vision: VisionConfig
    text: TextConfig
    image_token_index: int = 256000  # transformers' default; every hub file sets 257152
    projection_dim: int = 2048  # projector output; must equal the text hidden size
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 1

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "PaliGemmaConfig":
        if d.get("model_type", "paligemma") != "paligemma":
            raise ConfigError(f"{source}: model_type is {d['model_type']!r}, expected 'paligemma'")
        for key in ("vision_config", "text_config"):
            if not isinstance(d.get(key), dict):
                raise ConfigError(f"{source}: missing field {key!r} (a dict with the tower's sizes)")
        vision = _build(VisionConfig, d["vision_config"], {}, f"{source}: vision_config")
        t = dict(d["text_config"])
        model_type = t.get("model_type", "gemma")
        if model_type not in ("gemma", "gemma2"):
            raise ConfigError(f"{source}: text_config.model_type is {model_type!r}, expected 'gemma' or 'gemma2'")
        # transformers >= 5 nests rope_theta in rope_parameters; older files keep it flat
        if isinstance(t.get("rope_parameters"), dict) and "rope_theta" in t["rope_parameters"]:
            t["rope_theta"] = t["rope_parameters"]["rope_theta"]
        for key in ("hidden_act", "hidden_activation"):
            if t.get(key) is not None and t[key] not in _TANH_GELUS:
                raise ConfigError(f"{source}: text_config.{key} is {t[key]!r}; Gemma uses tanh-approximated gelu")
        defaults = GEMMA2_DEFAULTS if model_type == "gemma2" else {}
        text = _build(TextConfig, t, defaults, f"{source}: text_config")
        if model_type == "gemma2" and not text.layer_types:  # Gemma 2 alternates, starting with a sliding layer
            text.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(text.num_hidden_layers)]
        if len(text.layer_types) not in (0, text.num_hidden_layers):
            raise ConfigError(f"{source}: text_config.layer_types has {len(text.layer_types)} entries "
                              f"for {text.num_hidden_layers} layers")
        top = {f.name: d[f.name] for f in fields(cls) if f.name not in ("vision", "text") and d.get(f.name) is not None}
        config = cls(vision=vision, text=text, **top)
        if config.projection_dim != text.hidden_size:
            raise ConfigError(f"{source}: projection_dim {config.projection_dim} != text_config.hidden_size "
                              f"{text.hidden_size}: the projector must map into the decoder's width")
        return config

    @classmethod
    def from_json(cls, path: str | Path) -> "PaliGemmaConfig":
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read the config: {e}") from e
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        """The hub's config.json layout (what transformers' PaliGemmaConfig reads)."""
        v, t = self.vision, self.text
        text = dict(model_type=t.model_type, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                    num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, vocab_size=t.vocab_size,
                    rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, hidden_activation="gelu_pytorch_tanh",
                    num_image_tokens=self.num_image_tokens)
        if t.model_type == "gemma2":
            text.update(query_pre_attn_scalar=t.query_pre_attn_scalar, sliding_window=t.sliding_window,
                        attn_logit_softcapping=t.attn_logit_softcapping,
                        final_logit_softcapping=t.final_logit_softcapping, layer_types=t.layer_types)
        vision = dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                      intermediate_size=v.intermediate_size, num_hidden_layers=v.num_hidden_layers,
                      num_attention_heads=v.num_attention_heads, num_channels=v.num_channels,
                      image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.layer_norm_eps,
                      projection_dim=self.projection_dim, vision_use_head=False)
        return dict(architectures=["PaliGemmaForConditionalGeneration"], model_type="paligemma",
                    image_token_index=self.image_token_index, projection_dim=self.projection_dim,
                    hidden_size=self.projection_dim, pad_token_id=self.pad_token_id,
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
                    vision_config=vision, text_config=text)


def _build(cls, d: dict, defaults: dict, source: str):
    """Dataclass from a hub dict: required fields must be present, unknown hub fields are ignored."""
    values = dict(defaults)
    for f in fields(cls):
        if f.name in d and d[f.name] is not None:
            values[f.name] = d[f.name]
    missing = [f.name for f in fields(cls) if f.name not in values and _required(f)]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")
    obj = cls(**values)
    if isinstance(obj, VisionConfig) and obj.hidden_size % obj.num_attention_heads:
        raise ConfigError(f"{source}: hidden_size {obj.hidden_size} is not a multiple of "
                          f"num_attention_heads {obj.num_attention_heads}")
    if isinstance(obj, TextConfig) and obj.num_attention_heads % obj.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads {obj.num_attention_heads} is not a multiple of "
                          f"num_key_value_heads {obj.num_key_value_heads}")
    return obj


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING
