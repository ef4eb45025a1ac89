"""The README's detection pictures without training: the commands run on a random tiny model whose answers are
forced to the synthetic scenes' references (plus one malformed piece), so every box drawn is one the command
parsed. The attention maps on the report page are that random model's own on the forced answer: they show
what the page draws, not where a trained detector looks (docs/detection_example.py trains one first).

    python docs/detection_forced.py [OUT_DIR]      # seconds; OUT_DIR default docs/
"""
import contextlib
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

import paligemma.caption as caption_command
from paligemma import probe
import paligemma.probe.__main__ as probe_command
from paligemma.captioning.synthetic import detection_scene, make_checkpoint
from paligemma.tasks import detection_text

PROMPT = "detect building ; plane ; tank"


def forcing(load, text: str, stack: contextlib.ExitStack):
    """load_for_inference whose model writes the tokens of `text`, then <eos> (probe.forced_answer)."""
    def forced(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        stack.enter_context(probe.forced_answer(model, processor.tokenizer.encode(text) + [processor.tokenizer.eos_id]))
        return model, processor
    return forced


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="detect-forced-"))
    rng = random.Random(7)
    scenes = [detection_scene(rng) for _ in range(2)]
    texts = [detection_text(scenes[0][1], 64, 64) + " ; <loc0100><loc0200> tank",  # a malformed piece: 2 <loc>
             detection_text(scenes[1][1], 64, 64)]
    model = str(make_checkpoint(root / "model", texts, prompt=PROMPT, vocab_size=300, task_tokens=True))
    paths = []
    for i, (image, _) in enumerate(scenes):
        paths.append(root / f"scene{i}.png")
        image.save(paths[-1])
    load_caption, load_probe = caption_command.load_for_inference, probe_command.load_for_inference
    for path, text in zip(paths, texts):  # one image per call: each its own forced answer
        with contextlib.ExitStack() as stack:
            caption_command.load_for_inference = forcing(load_caption, text, stack)
            print("$ python -m paligemma.caption --model CKPT --prompt", repr(PROMPT), "--draw DIR", path.name)
            caption_command.main(["--model", model, "--prompt", PROMPT, "--draw", str(root / "drawn"), str(path)])
    caption_command.load_for_inference = load_caption
    drawn = [Image.open(root / "drawn" / p.name) for p in paths]
    both = Image.new("RGB", (sum(d.width for d in drawn) + 8, max(d.height for d in drawn)), "white")
    both.paste(drawn[0], (0, 0))
    both.paste(drawn[1], (drawn[0].width + 8, 0))
    both.save(out / "detection-drawn.png")
    with contextlib.ExitStack() as stack:
        probe_command.load_for_inference = forcing(load_probe, texts[0], stack)
        probe_command.main(["--model", model, str(paths[0]), "--prompt", PROMPT, "--max-new-tokens", "40",
                            "--out", str(root / "probe")])
    probe_command.load_for_inference = load_probe
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=1", "--window-size=1250,700", f"--screenshot={out / 'probe-boxes.png'}",
                    (root / "probe" / "scene0" / "report.html").as_uri() + "#token=2"], check=True, capture_output=True)
    print("wrote", out / "detection-drawn.png", "and", out / "probe-boxes.png", "; run in", root)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent)
