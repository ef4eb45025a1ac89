"""Recorded generation and what is read from it: where each token looked, the logit lens, the image's
part in a caption.

Axes: B batch, n generated tokens, T prompt tokens, S keys (the KV cache's slots), L decoder layers,
H heads, V vocabulary.
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .groups import GROUPS, slot_groups
from .hooking import DECODER, HEAD, _select, hooks

@dataclass
class Recording:
    """What probe.generate saw. `tokens` (B, n) new tokens; `input_ids` (B, T) the prompt (with its
    `attention_mask` and `token_type_ids`); `values[name]`
    one tensor per model call: [prefill, step 1, ...] (the vision tower's hooks fire in the prefill only).
    Generated token i was chosen from call i's last query position: the prefill's last prompt position
    for i = 0, then the call that fed token i - 1."""
    tokens: torch.Tensor
    input_ids: torch.Tensor
    values: dict = field(default_factory=dict)
    attention_mask: torch.Tensor | None = None  # (B, T); None: no padding
    token_type_ids: torch.Tensor | None = None  # (B, T); None: all prefix

    @property
    def logits(self) -> torch.Tensor:
        """(B, n, V) the logits each token was chosen from (soft-capped, as the head returns them)."""
        steps = self.values[HEAD]
        return torch.stack([s.reshape(s.shape[0], -1) for s in steps], 1).float()

    def step(self, token: int) -> dict:
        """{name: value at the query position that chose generated token `token`}: sequence axes cut to
        that one query, e.g. hook_pattern (B, H, 1, S), hook_resid_post (B, 1, D), lm_head (B, 1, V)."""
        out = {}
        for name, steps in self.values.items():
            if token >= len(steps):
                continue  # vision hooks: prefill only
            x = steps[token]
            if name == HEAD:
                out[name] = x.reshape(x.shape[0], 1, -1)
            elif name.endswith(("hook_q", "hook_k", "hook_v", "hook_pattern")):  # (B, heads, T, ...)
                out[name] = x[:, :, -1:]
            else:  # (B, T, ...)
                out[name] = x[:, -1:]
        return out

    def attention_shares(self, model) -> torch.Tensor:
        """(B, n, L, 4) each generated token's head-averaged attention summed over the key groups image,
        <bos>, prompt and earlier caption tokens (GROUPS, groups.py; the suffix is the caption so far, the
        querying token included), per decoder layer; the four add up to 1 (padding gets none). Token 0's
        row is the prefill's last prompt position, which sees no caption. Needs the decoder's hook_pattern."""
        L = model.config.text.num_hidden_layers
        valid = torch.ones_like(self.input_ids, dtype=torch.bool) if self.attention_mask is None \
            else self.attention_mask.bool()
        prefix = valid if self.token_type_ids is None else valid & (self.token_type_ids == 0)
        prompt = slot_groups(valid, prefix, model.config.num_image_tokens)  # (B, T)
        rows = []
        for i in range(self.tokens.shape[1]):
            step = self.step(i)
            p = torch.stack([step[DECODER.format(l) + "self_attn.hook_pattern"][:, :, 0] for l in range(L)], 1)
            S = p.shape[-1]  # (B, L, H, S): slots past the prompt hold generated tokens, the suffix
            labels = F.pad(prompt, (0, S - prompt.shape[1]), value=GROUPS.index("suffix"))  # (B, S)
            one_hot = F.one_hot(labels.clamp(min=0), len(GROUPS)) * (labels >= 0)[..., None]  # (B, S, 4)
            rows.append(p.mean(2) @ one_hot.float())  # (B, L, S) @ (B, S, 4) -> (B, L, 4)
        return torch.stack(rows, 1)

    def image_share(self, model) -> torch.Tensor:
        """(B, n, L) the image's part of attention_shares: each generated token's head-averaged attention on
        the image-token keys, per decoder layer."""
        return self.attention_shares(model)[..., GROUPS.index("image")]


@torch.no_grad()
def generate(model, input_ids, pixel_values, attention_mask=None, token_type_ids=None, max_new_tokens=32,
             names=None, **kwargs) -> Recording:
    """model.generate (greedy or sampling; see generation.py) that records every hook matching `names`
    (default all) at every call, and the logits of every step."""
    if kwargs.get("num_beams", 1) != 1:
        raise ValueError("probe.generate records one sequence per row: beam search (num_beams > 1) reorders the "
                         "rows between steps; record the chosen beam with probe.run_with_cache instead")
    values = {}

    def keep(x, name):
        values.setdefault(name, []).append(x.detach())

    chosen = [*_select(model, names or ["*"]), HEAD]  # names, so that "*" and HEAD do not record the head twice
    with hooks(model, dict.fromkeys(chosen, keep)):
        tokens = model.generate(input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens, **kwargs)
    return Recording(tokens, input_ids, values, attention_mask, token_type_ids)


def image_grid(model, attention: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Attention over the keys (B, ..., S) -> its image part folded to the patch grid (B, ..., n, n):
    16 x 16 at 224 px, 32 x 32 at 448, 64 x 64 at 896. input_ids (B, T), T <= S: the image tokens'
    positions (left padding shifts them); slots past T (later tokens) hold no image."""
    B, S = attention.shape[0], attention.shape[-1]
    N = model.config.num_image_tokens
    side = model.config.vision.image_size // model.config.vision.patch_size
    is_image = F.pad(input_ids == model.config.image_token_index, (0, S - input_ids.shape[1]))  # (B, S)
    pos = is_image.nonzero()[:, 1].view(B, N)  # (B, N) key index of patch j, row-major patch order
    index = pos.view(B, *[1] * (attention.dim() - 2), N).expand(*attention.shape[:-1], N)
    return attention.gather(-1, index).unflatten(-1, (side, side))


@torch.no_grad()
def logit_lens(model, cache: dict, k: int = 5):
    """Each decoder layer's output (`hook_resid_post` in `cache`) read through the final norm and the tied
    head (with Gemma 2's soft-cap), as if it were the last layer -> (probs, ids), each (L, B, T, k)."""
    L = model.config.text.num_hidden_layers
    lm = model.language_model
    names = [DECODER.format(l) + "hook_resid_post" for l in range(L)]
    missing = [n for n in names if n not in cache]
    if missing:
        raise KeyError(f"logit_lens needs every layer's hook_resid_post; missing {missing[0]!r} (record "
                       f"'*.hook_resid_post')")
    h = torch.stack([cache[n] for n in names])  # (L, B, T, D)
    probs = lm.lm_head(lm.model.norm(h), lm.model.embed_tokens.weight).float().softmax(-1)
    return probs.topk(k, dim=-1)


@torch.no_grad()
def image_ablation(model, input_ids, pixel_values, caption, attention_mask=None, token_type_ids=None) -> dict:
    """What a caption loses when the image is ablated: the log-probability of each caption token (B, n) given the
    prompt with its image, and with the image features zeroed (`hook_image_features` ablated).
    -> {"with_image", "without_image": (B, n) log-probs, "real": (B, n) bool, tokens up to <eos>}.
    A caption the image explains loses likelihood without it; one the language model would write anyway
    does not."""
    B, T = input_ids.shape
    n = caption.shape[1]
    eos = model.config.eos_token_id
    real = ((caption == eos).long().cumsum(1) - (caption == eos).long()) == 0  # up to and including <eos>
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if token_type_ids is None:
        token_type_ids = torch.zeros_like(input_ids)
    inputs = dict(input_ids=torch.cat([input_ids, caption], 1), pixel_values=pixel_values,
                  attention_mask=torch.cat([attention_mask, torch.ones_like(caption)], 1),
                  token_type_ids=torch.cat([token_type_ids, torch.ones_like(caption)], 1))

    def log_probs():
        h = model.hidden_states(**inputs)[:, T - 1:T - 1 + n]  # position t predicts token t + 1
        logp = F.log_softmax(model.language_model.logits(h).float(), -1)
        return logp.gather(-1, caption[..., None])[..., 0]  # (B, n)

    with_image = log_probs()
    with hooks(model, {"hook_image_features": lambda x, name: torch.zeros_like(x)}):
        without_image = log_probs()
    return {"with_image": with_image, "without_image": without_image, "real": real}
