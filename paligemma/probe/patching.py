"""Activation patching (causal tracing, Meng et al. 2022): which activations carry the difference between
a clean input and a corrupted one to the output.

    sweep = probe.patch_sweep(model, clean, corrupted, target=(red, blue))     # (sites, layers, groups)
    probe.plot_sweep(sweep, columns=probe.sweep_columns(model, clean))                 # labels: the groups

The corrupted input is run with one clean activation restored at a time: one site (a per-layer hook
point), one layer, one set of positions. Each run is scored by the target's logit difference at the
last position, logit[clean token] - logit[corrupted token] (or any function of the last position's
logits), normalised as (patched - corrupted) / (clean - corrupted): 1 = fully restored, 0 = as
corrupted. Restoring `resid_post` of any layer at every position gives the clean output, so 1 exactly;
restoring nothing would give 0.

Sites are the per-layer (B, T, D) hook points of gemma.py: `attn_out` (what the attention block adds
to the residual stream, after Gemma 2's post-attention norm), `mlp_out` (likewise for the MLP),
`resid_mid` and `resid_post` (the stream after each). Positions: "groups" (the token groups image,
<bos>, prompt, suffix, groups.py, those present), "each" (every position), or {label: [positions]}.

Batched: a patched run at layer l is the corrupted run up to layer l, so each layer's runs start from
the corrupted run's residual there (computed once) and go through layers l..L-1 together, `batch_size`
rows per forward. A sweep over the 4 groups, 3 sites and 18 layers of PaliGemma-3B is 18 such
forwards (of 12 rows, half the layers on average) besides the clean and corrupted runs.

Axes: P position columns, R patched runs in one forward, T tokens, D hidden size, V vocabulary.
"""
import torch

from ..gemma import rope
from .groups import group_positions, token_groups
from .hooking import DECODER, hooks

SITES = {"attn_out": "hook_attn_out", "resid_mid": "hook_resid_mid", "mlp_out": "hook_mlp_out",
         "resid_post": "hook_resid_post"}


def sweep_columns(model, inputs: dict, positions="groups") -> dict:
    """positions ("groups", "each" or {label: [positions]}) -> {label: [positions]}: the sweep's columns."""
    T = inputs["input_ids"].shape[1]
    if positions == "groups":
        return group_positions(token_groups(model, **inputs))
    if positions == "each":
        return {str(t): [t] for t in range(T)}
    if isinstance(positions, dict) and positions:
        bad = [p for ps in positions.values() for p in ps if not -T <= int(p) < T]
        if bad or not all(len(ps) for ps in positions.values()):
            raise ValueError(f"patch_sweep: positions {positions!r} must be non-empty lists within the {T} tokens")
        return {str(k): [int(p) % T for p in ps] for k, ps in positions.items()}
    raise ValueError(f"patch_sweep: positions must be 'groups', 'each' or {{label: [positions]}}, got {positions!r}")


def _metric(target):
    """target -> f(logits (R, V)) -> (R,) float32."""
    if callable(target):
        return target
    try:
        good, bad = (int(t) for t in target)
    except (TypeError, ValueError):
        raise ValueError(f"patch_sweep: target must be (clean token id, corrupted token id) or a function of the "
                         f"last position's logits (R, V) -> (R,), got {target!r}") from None
    return lambda logits: logits[:, good].float() - logits[:, bad].float()


def _check(model, clean: dict, corrupted: dict):
    for name, x in clean.items():
        y = corrupted.get(name)
        if y is None or x is None or x.shape != y.shape:
            raise ValueError(f"patch_sweep: clean and corrupted inputs must have the same fields and shapes, so "
                             f"that positions line up; {name!r} is {None if x is None else tuple(x.shape)} clean, "
                             f"{None if y is None else tuple(y.shape)} corrupted")
    if clean["input_ids"].shape[0] != 1:
        raise ValueError(f"patch_sweep takes one clean/corrupted pair (batch 1), got batch {clean['input_ids'].shape[0]}")
    if "attention_mask" in clean and not torch.equal(clean["attention_mask"], corrupted["attention_mask"]):
        raise ValueError("patch_sweep: clean and corrupted inputs must have the same attention_mask")


@torch.no_grad()
def _run(model, inputs: dict, names: list[str]):
    """-> (last position's logits (1, V), {hook name: (1, T, D)}) of one plain forward."""
    cache = {}

    def keep(x, name):
        cache[name] = x.detach()

    with hooks(model, {n: keep for n in names}):
        h = model.hidden_states(**inputs)
    return _last_logits(model, h), cache


def _last_logits(model, h: torch.Tensor) -> torch.Tensor:
    """(R, T, D) final-normed states -> (R, V) logits at the last position, one run at a time: CPU matmuls
    round a row differently at different row counts, and a run's score must not depend on how many runs
    share its forward (nor may the sweep's ends miss 0 and 1)."""
    return torch.stack([model.language_model.logits(h[r, -1]) for r in range(h.shape[0])])


@torch.no_grad()
def _from_layer(model, start: int, x: torch.Tensor, attention_mask, token_type_ids) -> torch.Tensor:
    """Decoder layers start..L-1 on their input x (R, T, D), as GemmaModel.forward runs them -> the last
    position's logits (R, V)."""
    lm = model.language_model.model
    positions, masks = model.attention_inputs(None, attention_mask, token_type_ids)
    cos, sin = rope(positions, lm.config.head_dim, lm.config.rope_theta, x.dtype)
    for layer in lm.layers[start:]:
        x = layer(x, cos=cos, sin=sin, mask=masks["sliding" if layer.sliding else "full"])
    return _last_logits(model, lm.norm(x[:, -1:]))


@torch.no_grad()
def patch_sweep(model, clean: dict, corrupted: dict, target, sites=("resid_post", "attn_out", "mlp_out"),
                positions="groups", layers=None, batch_size: int = 16) -> torch.Tensor:
    """-> (len(sites), len(layers), P) float32: the restored fraction of the target's logit difference when
    the clean value of each site, layer and position column is patched into the corrupted run (module
    docstring). clean, corrupted: model inputs of one row each, same shapes (another image, or another
    prompt of the same length). layers: default all decoder layers."""
    _check(model, clean, corrupted)
    unknown = [s for s in sites if s not in SITES]
    if unknown or not sites:
        raise ValueError(f"patch_sweep: unknown sites {unknown or sites}; expected some of {list(SITES)}")
    n_layers = model.config.text.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [int(l) for l in layers]
    if not layers or not all(0 <= l < n_layers for l in layers):
        raise ValueError(f"patch_sweep: layers {layers} are not decoder layers (0-{n_layers - 1})")
    columns = list(sweep_columns(model, clean, positions).values())
    metric = _metric(target)
    names = [DECODER.format(l) + SITES[s] for l in layers for s in sites]
    resid = ["hook_embed"] + [DECODER.format(l) + "hook_resid_post" for l in range(n_layers - 1)]  # layer inputs
    clean_logits, clean_cache = _run(model, clean, names)
    corrupt_logits, corrupt_cache = _run(model, corrupted, resid)
    top, bottom = metric(clean_logits)[0], metric(corrupt_logits)[0]
    if not torch.isfinite(top - bottom) or top == bottom:
        raise ValueError(f"patch_sweep: the target scores {float(top):.4g} clean and {float(bottom):.4g} corrupted: "
                         f"no difference to restore")
    T = clean["input_ids"].shape[1]
    mask = corrupted.get("attention_mask")
    mask = torch.ones(1, T, dtype=torch.long, device=model.device) if mask is None else mask
    types = corrupted.get("token_type_ids")
    runs = [(s, c) for s in range(len(sites)) for c in range(len(columns))]
    out = torch.empty(len(sites), len(layers), len(columns))
    for j, l in enumerate(layers):
        x = corrupt_cache[resid[l]]  # (1, T, D): the input of layer l in the corrupted run
        for k in range(0, len(runs), batch_size):
            chunk = runs[k:k + batch_size]
            R = len(chunk)
            patches = {}
            for i, site in enumerate(sites):  # rows that patch this site: which positions
                where = torch.zeros(R, T, 1, dtype=torch.bool, device=x.device)
                for r, (s, c) in enumerate(chunk):
                    if s == i:
                        where[r, columns[c]] = True
                if where.any():
                    name = DECODER.format(l) + SITES[site]
                    patches[name] = lambda y, n, where=where: torch.where(where, clean_cache[n], y)
            with hooks(model, patches):
                logits = _from_layer(model, l, x.expand(R, -1, -1), mask.expand(R, -1),
                                     None if types is None else types.expand(R, -1))
            score = (metric(logits).float() - bottom) / (top - bottom)  # (R,)
            for r, (s, c) in enumerate(chunk):
                out[s, j, c] = score[r]
    return out


def plot_sweep(sweep: torch.Tensor, sites=("resid_post", "attn_out", "mlp_out"), columns=None, layers=None,
               title: str | None = None):
    """A patch sweep (sites, layers, P) as one heatmap per site (layers down, positions across) -> the
    matplotlib Figure (the `plot` extra). columns: position labels (e.g. the group names)."""
    import matplotlib.pyplot as plt
    n_sites, n_layers, P = sweep.shape
    columns = [str(c) for c in range(P)] if columns is None else list(columns)
    layers = list(range(n_layers)) if layers is None else list(layers)
    longest = max(len(c) for c in columns) if P > 6 or any(len(c) > 6 for c in columns) else 0  # rotated labels
    fig, axes = plt.subplots(1, n_sites, figsize=(1.2 + n_sites * max(2.0, 0.35 * P + 0.8),
                                                  1.6 + 0.22 * n_layers + 0.07 * longest),
                             squeeze=False, constrained_layout=True)
    top = max(1.0, float(sweep.abs().max()))
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(sweep[i].numpy(), cmap="RdBu_r", vmin=-top, vmax=top, aspect="auto", interpolation="nearest")
        ax.set_title(sites[i] if i < len(sites) else f"site {i}", fontsize=10)
        ax.set_xticks(range(P), columns, rotation=90 if longest else 0, fontsize=8)
        ax.set_yticks(range(n_layers), layers, fontsize=7)
        ax.set_xlabel("patched positions")
        if i == 0:
            ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="restored logit difference (1 = clean)")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig
