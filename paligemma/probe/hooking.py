"""Reading and replacing named tensors: the hook names, `hooks`, `forced_answer`, `run_with_cache`.

Names are module paths from the model root: the hook points of hookpoint.py and `language_model.lm_head`,
whose output is every call's logits. Patterns are fnmatch patterns over those names.
"""
import contextlib
import fnmatch

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


@contextlib.contextmanager
def forced_answer(model, ids: list[int]):
    """While active, the model's first len(ids) head calls choose `ids` in turn (the chosen id's logit is
    raised above all others), so that greedy generation writes a given answer and a recording holds the
    model's own attention on it (a random model writes no boxes; a reference answer can be probed).
    Later calls (the logit lens, image ablation, knockout) are left alone."""
    calls = [0]

    def force(logits, name):
        i, calls[0] = calls[0], calls[0] + 1
        if i < len(ids):
            logits = logits.clone()
            logits[..., ids[i]] = logits.max() + 30
            return logits
    with hooks(model, {HEAD: force}):
        yield


def run_with_cache(model, names=None, **inputs):
    """-> (logits, cache): the model's forward on `inputs`, and {hook name: detached tensor} for every
    name matching `names` (fnmatch patterns; default all). The logits equal a plain forward's bit for bit."""
    cache = {}

    def keep(x, name):
        cache[name] = x.detach()

    with hooks(model, {p: keep for p in (names or ["*"])}):
        logits = model(**inputs)
    return logits, cache
