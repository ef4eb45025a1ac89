"""Instruments for studying the internals: read or replace any named tensor, record a generation, block
attention edges, patch activations.

    from paligemma import probe
    logits, cache = probe.run_with_cache(model, ["*.hook_resid_post"], **inputs)    # read
    with probe.hooks(model, {"hook_image_features": lambda x, name: torch.zeros_like(x)}):
        blind = model(**inputs)                                                      # replace
    with probe.forced_answer(model, ids):
        rec = probe.generate(model, **inputs, max_new_tokens=len(ids))               # a given answer
    rec = probe.generate(model, **inputs, max_new_tokens=20)                         # every step
    heat = probe.image_grid(model, rec.step(3)["language_model.model.layers.5.self_attn.hook_pattern"],
                            rec.input_ids)                                           # (B, H, 1, 16, 16)
    with probe.knockout(model, block={"suffix": ["image"]}, layers=range(10, 18)):
        tokens = model.generate(**inputs)                                            # edges removed
    sweep = probe.patch_sweep(model, clean, corrupted, target=(red_id, blue_id))     # (sites, layers, groups)

Names are module paths from the model root: the hook points of hookpoint.py (`probe.hook_names(model)`
lists them) and `language_model.lm_head`, whose output is every call's logits. Patterns are fnmatch
patterns over those names. Listening to a `hook_pattern` makes that attention spell out its
probabilities (attention.py); nothing else changes when hooks only read.

Read in this order: hooking.py (names, hooks, run_with_cache), recording.py (probe.generate, where each
token looked, logit lens, image ablation), groups.py (image / <bos> / prompt / suffix), knockout.py,
patching.py; the report page and its command: report.py, __main__.py (`python -m paligemma.probe --help`).
"""
import warnings

from .groups import GROUPS, group_positions, token_groups
from .hooking import DECODER, HEAD, forced_answer, hook_names, hooks, run_with_cache
from .knockout import knockout
from .patching import SITES, patch_sweep, plot_sweep, sweep_columns
from .recording import Recording, generate, image_ablation, image_grid, logit_lens


def image_reliance(*args, **kwargs) -> dict:
    """Deprecated name of image_ablation (renamed by what it measures: the caption's per-token
    log-probabilities with the image features zeroed)."""
    warnings.warn("probe.image_reliance is renamed probe.image_ablation (same arguments, same result)",
                  DeprecationWarning, stacklevel=2)
    return image_ablation(*args, **kwargs)


__all__ = ["hook_names", "hooks", "forced_answer", "run_with_cache", "Recording", "generate", "image_grid", "logit_lens",
           "image_ablation", "image_reliance", "GROUPS", "token_groups", "group_positions", "knockout",
           "patch_sweep", "plot_sweep", "sweep_columns", "SITES", "HEAD", "DECODER"]
