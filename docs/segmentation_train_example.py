"""train.py --vae on generated mask files: does the tiny model learn where each mask is? (issue #21)

No vae-oid.npz can be downloaded here, so the VQ-VAE is the tests' hand-built one (tests/tasks/vae_files.py
`blocky_vae(encoder=True)`: each 16 x 16 block of the 64 x 64 crop is one code, set or not). The set
(tests/tasks/mask_sets.py): 64 x 64 images of dark noise, one yellow 32 x 32 object each, a rectangle or
an ellipse (alternating), its corner at one of 3 x 3 places 16 px apart, its mask file beside the JSONL;
306 train, 54 val, 54 test rows, prompt "segment shape", the label the shape. The answer is four <loc>,
sixteen <seg> (a rectangle's all set, an ellipse's corners clear) and the label; only the pixels say
where. The tiny random PaliGemma trained in full, 1000 steps of 16, lr 2e-3 after 100 warm-up steps.

    python docs/segmentation_train_example.py OUT [--blind] [--seed N]

The ceiling: the references' own answers, decoded, against the mask files (what a model that writes
every answer exactly scores), printed first.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' VQ-VAE and set builders

import train  # noqa: E402
from paligemma.captioning.data import load_examples  # noqa: E402
from paligemma.tasks import MaskDecoder, MaskEncoder, parse_segmentations, score_segmentations  # noqa: E402
from paligemma.tasks.mask_files import reference_segments, with_answers  # noqa: E402
from tests.tasks.mask_sets import write_mask_set  # noqa: E402
from tests.tasks.vae_files import blocky_vae  # noqa: E402

BOXES = [(x, y, x + 32, y + 32) for y in (0, 16, 32) for x in (0, 16, 32)]


def ceiling(data: Path, vae: Path, split: str) -> dict:
    examples = with_answers(load_examples(data, split)[0], MaskEncoder.from_npz(vae))
    decoder = MaskDecoder.from_npz(vae)
    preds = [parse_segmentations(e.captions[0], 64, 64, decoder) for e in examples]
    return score_segmentations(preds, [(r[0].box, r[0].mask) for r in (reference_segments(e.masks) for e in examples)])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--blind", action="store_true", help="the image-blind control")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    root = Path(args.out)
    data, vae = root / "data" / "rows.jsonl", root / "blocky.npz"
    if not data.exists():
        write_mask_set(data.parent, splits=(("train", 306), ("val", 54), ("test", 54)), boxes=BOXES,
                       kinds=("rectangle", "ellipse"))
        blocky_vae(vae, encoder=True)
    print("ceiling (test):", ceiling(data, vae, "test"))
    out = root / f"{'blind' if args.blind else 'true'}-seed{args.seed}"
    train.main(["--data", str(data), "--vae", str(vae), "--out", str(out), "--steps", "1000", "--batch-size", "16",
                "--lr", "2e-3", "--warmup", "100", "--eval-every", "100", "--val-captions", "54", "--eval-samples", "54",
                "--seed", str(args.seed)] + (["--blind"] if args.blind else []))
    for line in open(out / "metrics.jsonl"):
        r = json.loads(line)
        if "val_miou" in r:
            print(f"step {r['step']}: val mIoU {r['val_miou']:.4f}, image gap {r['image_gap']:+.3f}")


if __name__ == "__main__":
    main()
