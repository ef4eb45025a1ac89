"""Instruments for studying the internals: read or replace any named tensor, record a generation.

    from paligemma import probe
    logits, cache = probe.run_with_cache(model, ["*.hook_resid_post"], **inputs)    # read
    with probe.hooks(model, {"hook_image_features": lambda x, name: torch.zeros_like(x)}):
        blind = model(**inputs)                                                      # replace
    rec = probe.generate(model, **inputs, max_new_tokens=20)                         # every step
    heat = probe.image_grid(model, rec.step(3)["language_model.model.layers.5.self_attn.hook_pattern"],
                            rec.input_ids)                                           # (B, H, 1, 16, 16)

Names are module paths from the model root: the hook points of hookpoint.py (`probe.hook_names(model)`
lists them) and `language_model.lm_head`, whose output is every call's logits. Patterns are fnmatch
patterns over those names. Listening to a `hook_pattern` makes that attention spell out its
probabilities (attention.py); nothing else changes when hooks only read.

The report page and its command: report.py, __main__.py (`python -m paligemma.probe --help`).
"""
import contextlib
import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..hookpoint import HookPoint

HEAD = "language_model.lm_head"
DECODER = "language_model.model.layers.{}."


def hook_names(model) -> list[str]:
    """Every name probe can hook, in the order a forward reaches them (vision tower first)."""
    return [n for n, m in model.named_modules() if isinstance(m, HookPoint)] + [HEAD]


def _select(model, patterns) -> dict:
    """{name: module} for the names matching any of `patterns`; a pattern matching nothing is an error."""
    modules = dict(model.named_modules())
    names = hook_names(model)
    chosen = {}
    for pattern in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise KeyError(f"hook name pattern {pattern!r} matches none of the model's {len(names)} hook names "
                           f"(e.g. {names[0]!r}; see probe.hook_names(model))")
        chosen.update((n, modules[n]) for n in hits)
    return chosen


@contextlib.contextmanager
def hooks(model, fns: dict):
    """While active, `fn(tensor, name)` runs on every value of each hook whose name matches `pattern`
    in {pattern: fn}; a returned tensor replaces the value (ablation, patching), None keeps it."""
    handles = []
    try:
        for pattern, fn in fns.items():
            for name, module in _select(model, [pattern]).items():
                handles.append(module.register_forward_hook(lambda m, args, out, fn=fn, name=name: fn(out, name)))
        yield
    finally:
        for h in handles:
            h.remove()


def run_with_cache(model, names=None, **inputs):
    """-> (logits, cache): the model's forward on `inputs`, and {hook name: detached tensor} for every
    name matching `names` (fnmatch patterns; default all). The logits equal a plain forward's bit for bit."""
    cache = {}

    def keep(x, name):
        cache[name] = x.detach()

    with hooks(model, {p: keep for p in (names or ["*"])}):
        logits = model(**inputs)
    return logits, cache


@dataclass
class Recording:
    """What probe.generate saw. `tokens` (B, n) new tokens; `input_ids` (B, T) the prompt; `values[name]`
    one tensor per model call: [prefill, step 1, ...] (the vision tower's hooks fire in the prefill only).
    Generated token i was chosen from call i's last query position: the prefill's last prompt position
    for i = 0, then the call that fed token i - 1."""
    tokens: torch.Tensor
    input_ids: torch.Tensor
    values: dict = field(default_factory=dict)

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

    def image_share(self, model) -> torch.Tensor:
        """(B, n, L) each generated token's head-averaged attention on the image-token keys, per decoder
        layer (needs the decoder's hook_pattern recorded)."""
        L = model.config.text.num_hidden_layers
        is_image = self.input_ids == model.config.image_token_index  # (B, T)
        rows = []
        for i in range(self.tokens.shape[1]):
            step = self.step(i)
            p = torch.stack([step[DECODER.format(l) + "self_attn.hook_pattern"][:, :, 0] for l in range(L)], 1)
            rows.append((p[..., :is_image.shape[1]] * is_image[:, None, None]).sum(-1).mean(-1))  # (B, L)
        return torch.stack(rows, 1)


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

    patterns = list(names or ["*"]) + [HEAD]
    with hooks(model, {p: keep for p in patterns}):
        tokens = model.generate(input_ids, pixel_values, attention_mask, token_type_ids, max_new_tokens, **kwargs)
    return Recording(tokens, input_ids, values)


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
def image_reliance(model, input_ids, pixel_values, caption, attention_mask=None, token_type_ids=None) -> dict:
    """How much a caption leans on its image: the log-probability of each caption token (B, n) given the
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
