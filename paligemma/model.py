"""PaliGemma = SigLIP vision tower + linear projector + Gemma decoder, as a prefix-LM.

The sequence the decoder sees (the processor builds it):

    [<image> x N] <bos> prompt \\n | suffix <eos>
    '-------- prefix (token_type 0) ---------' '- suffix (1) -'

Each `<image>` placeholder is replaced by one projected SigLIP patch embedding. The prefix attends
bidirectionally to itself; suffix tokens attend causally to everything before them. Left padding is
honoured through `attention_mask` and does not shift position ids, which start at 1.

Hook points (hookpoint.py) at model level: `hook_image_features`, `hook_embed`; the logits of every
call pass through the module `language_model.lm_head`. Per layer, see gemma.py and siglip.py.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, attention_masks, position_ids  # noqa: F401 (attention_masks: also read from here)
from .config import IGNORE, PaliGemmaConfig
from .gemma import GemmaForCausalLM, GemmaRMSNorm
from .hookpoint import HookPoint
from .siglip import SiglipVisionTower
from .weights import canonical, to_transformers

# LoRA presets: one part of PaliGemma each, as a regex over module names (PEFT's re.fullmatch semantics)
_N = r"\d+"
LORA_TARGETS = {
    "decoder": rf"language_model\.model\.layers\.{_N}\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)",
    "vision": rf"vision_tower\.vision_model\.encoder\.layers\.{_N}\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))",
    "projector": r"multi_modal_projector\.linear",
}
LORA_TARGETS["all"] = "|".join(f"({p})" for p in LORA_TARGETS.values())


class MultiModalProjector(nn.Module):
    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.linear = nn.Linear(config.vision.hidden_size, config.projection_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class PaliGemma(nn.Module):
    # Facts about this model that other packages read through these attributes (lora/ never imports
    # this module): LoRA presets by name, the parts lora.summary counts, and the names transformers
    # (and so PEFT) gives our modules (weights.TRANSFORMERS_NAMES).
    lora_targets = LORA_TARGETS
    parts = {"vision_tower": "vision", "multi_modal_projector": "projector", "language_model": "decoder"}
    to_transformers = staticmethod(to_transformers)
    from_transformers = staticmethod(canonical)

    def __init__(self, config: PaliGemmaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = SiglipVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = GemmaForCausalLM(config.text)
        self.hook_image_features = HookPoint()  # (B, N, D) projected patches, before they enter the text
        self.hook_embed = HookPoint()  # (B, T, D) the merged decoder input

    @classmethod
    def from_pretrained(cls, path_or_repo_id, dtype=torch.float32, device="cpu", revision=None,
                        inference: bool = False, quantize: str | None = None, adapter=None) -> "PaliGemma":
        """Local folder or hub repo id (hub layout, single or sharded safetensors); see weights.py.
        inference=True: for captioning, not training: weights frozen and, on CPU, packed (packing.py).
        quantize="int8" | "nf4": linear layers quantized while loading (quantize.py).
        adapter: a LoRA adapter folder (PEFT format) applied after loading (lora.load)."""
        from .weights import load_pretrained
        return load_pretrained(cls, path_or_repo_id, dtype=dtype, device=device, revision=revision,
                               inference=inference, quantize=quantize, adapter=adapter)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Gemma-style init for training from scratch: normal(0, std) weights, zero biases, LayerNorms at
        1, RMSNorms at (1 + 0). Loading a checkpoint needs none of this."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
                m.weight.normal_(0, std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
            elif isinstance(m, GemmaRMSNorm):
                m.weight.zero_()
        return self

    def save_pretrained(self, directory, max_shard_bytes: int | None = None, state_dict: dict | None = None):
        """Hub layout: config.json + safetensors, written atomically; see weights.py."""
        from .weights import save_pretrained
        save_pretrained(self, directory, max_shard_bytes, state_dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.model.embed_tokens.weight.device

    def set_gradient_checkpointing(self, enabled: bool = True):
        self.vision_tower.vision_model.gradient_checkpointing = enabled
        self.language_model.model.gradient_checkpointing = enabled

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, N, D_text): one decoder embedding per image patch."""
        return self.hook_image_features(self.multi_modal_projector(self.vision_tower(pixel_values)))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) decoder inputs with image features at the <image> positions.

        Text embeddings are scaled by sqrt(D); image features are not. (Older transformers divide the
        image features by sqrt(D_text) and then scale the whole sequence: the same function.)
        """
        is_image = input_ids == self.config.image_token_index
        # the <image> id may lie past the embedding table; its rows are overwritten anyway
        x = self.language_model.model.embed(input_ids.masked_fill(is_image, 0))
        if pixel_values is None:
            return x
        feats = self.image_features(pixel_values).to(x.dtype)  # (B, N, D)
        n_placeholders = int(is_image.sum())
        if n_placeholders != feats.shape[0] * feats.shape[1]:
            raise ValueError(f"input_ids hold {n_placeholders} <image> tokens (id {self.config.image_token_index}) "
                             f"but pixel_values give {feats.shape[0]} images x {feats.shape[1]} patches")
        return x.masked_scatter(is_image[..., None], feats)

    def attention_inputs(self, input_ids=None, attention_mask=None, token_type_ids=None,
                         cache: KVCache | None = None) -> tuple[torch.Tensor, dict]:
        """Position ids (B, T) and masks {"full": m, "sliding": m}, m (B, 1, T, S) bool, True = may attend,
        exactly as the forward builds them for these T tokens. S = T, or the cache's slots: the cache is
        read, not changed (the forward records the tokens in it afterwards). Of input_ids only the shape
        is read. A left-padded row, 2 image tokens, <bos>, one prompt token, two suffix tokens:

            attention_mask  0 1 1 1 1 1 1        mask (query rows, key columns), 1 = may attend:
            token_type_ids  0 0 0 0 0 1 1          pad  1 . . . . . .   (sees itself: no empty row)
            position_ids    1 1 2 3 4 5 6          img  . 1 1 1 1 . .   prefix: bidirectional
                                                   img  . 1 1 1 1 . .
                                                   bos  . 1 1 1 1 . .
                                                   txt  . 1 1 1 1 . .
                                                   suf  . 1 1 1 1 1 .   suffix: causal
                                                   suf  . 1 1 1 1 1 1
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        T = attention_mask.shape[1]
        real, prefix = attention_mask.bool(), prefix_flags(attention_mask, token_type_ids)
        if cache is None:
            slots = torch.arange(T, device=real.device)
            positions, valid, is_prefix = position_ids(attention_mask), real, prefix
        else:  # the slots filled so far, then these T tokens
            slots = cache.next_slots(T)
            positions, valid, is_prefix = cache.preview(attention_mask, prefix, slots)
        return positions, self.masks(slots, T, valid, is_prefix)

    def masks(self, slots: torch.Tensor, T: int, valid: torch.Tensor, prefix: torch.Tensor) -> dict:
        """{"full": m, "sliding": m}, m (B, 1, T, S), for T queries at slots `slots` (T,) given each slot's
        flags valid, prefix (B, S) (cache.attention_masks, with this model's window). Every forward,
        cached or not, and every decode step builds its masks here: the one place probe.knockout edits."""
        return attention_masks(slots, T, valid, prefix, self.config.text.sliding_window)

    def hidden_states(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None,
                      position_ids=None, cache: KVCache | None = None, inputs_embeds=None) -> torch.Tensor:
        """(B, T) -> (B, T, D) final-normed decoder states. With a cache, the T tokens are appended to it.
        inputs_embeds (B, T, D) replaces input_ids and pixel_values: the merged decoder input, as `embed`
        returns it and `hook_embed` sees it (for patching or attribution on the embeddings)."""
        if inputs_embeds is not None:
            if input_ids is not None or pixel_values is not None:
                raise ValueError("inputs_embeds is the merged decoder input (image features already in place): "
                                 "pass it instead of input_ids and pixel_values, not with them")
            x = inputs_embeds
        else:
            if pixel_values is None and (cache is None or cache.length == 0) \
                    and bool((input_ids == self.config.image_token_index).any()):
                raise ValueError("input_ids hold <image> tokens but no pixel_values were given")
            x = self.embed(input_ids, pixel_values)
        x = self.hook_embed(x)  # (B, T, D)
        if attention_mask is None:
            attention_mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
        if cache is None:
            positions, masks = self.attention_inputs(None, attention_mask, token_type_ids)
            slots = None
        else:  # the cache records the T tokens, then the masks span all of its slots
            slots, positions = cache.append(attention_mask, prefix_flags(attention_mask, token_type_ids))
            masks = self.masks(slots, x.shape[1], cache.valid, cache.prefix)
        return self.language_model.model(x, positions if position_ids is None else position_ids, masks, cache, slots)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, token_type_ids=None,
                position_ids=None, cache: KVCache | None = None, inputs_embeds=None) -> torch.Tensor:
        """Same inputs as transformers' PaliGemmaForConditionalGeneration; returns logits (B, T, vocab)."""
        h = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids, position_ids, cache,
                               inputs_embeds)
        return self.language_model.logits(h)

    def loss(self, input_ids, pixel_values, attention_mask, token_type_ids, labels, reduction="mean") -> torch.Tensor:
        """Next-token cross-entropy over tokens whose label is not IGNORE (-100; "mean", or "sum" for callers that
        normalise by a count across processes).

        Logits are computed only where a label exists: at 257k vocabulary entries the full
        (B, T, vocab) tensor would dwarf everything else in a training step.
        """
        h = self.hidden_states(input_ids, pixel_values, attention_mask, token_type_ids)
        target = labels[:, 1:]  # position t predicts token t + 1
        keep = target != IGNORE
        logits = self.language_model.logits(h[:, :-1][keep]).float()  # (K, vocab)
        return F.cross_entropy(logits, target[keep], reduction=reduction)

    def generate(self, input_ids, pixel_values, attention_mask=None, token_type_ids=None, max_new_tokens=32,
                 **kwargs) -> torch.Tensor:
        """New tokens only, (B, <= max_new_tokens), padded after <eos>; see generation.py for the options."""
        from .generation import generate
        return generate(self, input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens, **kwargs)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        t = self.config.text
        return KVCache(batch, max_len, t.num_hidden_layers, t.num_key_value_heads, t.head_dim,
                       self.dtype, self.device)


def prefix_flags(attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool: real tokens of the bidirectional prefix (token type 0; all of them without types)."""
    real = attention_mask.bool()
    return real if token_type_ids is None else (token_type_ids == 0) & real
