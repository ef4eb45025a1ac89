"""The import graph of paligemma/ and lora/, read from the source (every import statement, also those
inside functions): no cycle, lora imports nothing of paligemma, and every import points down LAYERS.

A new module must be placed in LAYERS (the test names it): where it sits says what it may use."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import modules of its own layer or below, never above. Within a layer
# the graph must still be acyclic.
LAYERS = [
    # what everything may use: formats, conventions, crash-safe writes, argparse helpers
    ["paligemma.config", "paligemma.atomic", "paligemma.hookpoint", "paligemma.safetensors_io",
     "paligemma.tokenizer", "paligemma.cli"],
    # the model's parts
    ["paligemma.attention", "paligemma.cache", "paligemma.checkpointing"],
    ["paligemma.siglip", "paligemma.gemma"],
    # mechanisms that work on a built model (duck-typed: they never import model.py)
    ["paligemma.dequantize", "paligemma.int4", "paligemma.packing", "paligemma.quantize", "paligemma.generation"],
    # checkpoints in and out (converting while loading: packing, quantize)
    ["paligemma.weights"],
    # the model and its inputs
    ["paligemma.model", "paligemma.processor"],
    ["paligemma"],
    # around the model: commands and instruments
    ["paligemma.inference", "paligemma.verify", "paligemma.probe", "paligemma.probe.hooking",
     "paligemma.probe.groups", "paligemma.probe.recording", "paligemma.probe.knockout", "paligemma.probe.patching",
     "paligemma.probe.report", "paligemma.probe.locations", "paligemma.probe.__main__", "paligemma.tasks.boxes",
     "paligemma.tasks.answers", "paligemma.tasks.average_precision", "paligemma.tasks.resampled_ap", "paligemma.tasks.vqvae",
     "paligemma.tasks.segmentation", "paligemma.tasks.confidence", "paligemma.tasks.mask_files"],
    # the fine-tuning application
    ["paligemma.tasks", "paligemma.tasks.registry", "paligemma.tasks.readout", "paligemma.caption", "paligemma.captioning", "paligemma.captioning.wordnet", "paligemma.captioning.metrics",
     "paligemma.captioning.meteor_java", "paligemma.captioning.resampled_cider", "paligemma.captioning.bootstrap", "paligemma.captioning.scorer",
     "paligemma.captioning.data", "paligemma.captioning.distributed", "paligemma.captioning.curves",
     "paligemma.captioning.synthetic", "paligemma.captioning.results", "paligemma.captioning.precision",
     "paligemma.captioning.run_folder",
     "paligemma.captioning.training",
     "paligemma.captioning.validation",
     "paligemma.tasks.resampling", "paligemma.tasks.evaluation"],
]
LORA = ["lora.layer", "lora.inject", "lora.peft_format", "lora"]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ("paligemma", "lora"):
        for path in (ROOT / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: Path, known: dict) -> set[str]:
    """Project modules that `name` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            # `from . import packing` imports the submodule; `from .config import X` the module itself
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_module_is_placed():
    placed = {m for layer in LAYERS for m in layer} | set(LORA)
    missing = sorted(set(modules()) - placed)
    assert not missing, f"modules not in tests/test_imports.py LAYERS (place them where they belong): {missing}"


def test_no_import_cycle():
    g = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_imports_point_down_the_layers():
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer} | {m: i for i, m in enumerate(LORA)}
    upward = [f"{m} imports {t}" for m, targets in graph().items() for t in sorted(targets)
              if m.split(".")[0] == t.split(".")[0] and level[t] > level[m]]
    assert not upward, "imports from a lower module to a higher one:\n  " + "\n  ".join(upward)


def test_lora_imports_nothing_of_paligemma():
    g = graph()
    assert not [(m, t) for m in g if m.startswith("lora") for t in g[m] if t.startswith("paligemma")]
