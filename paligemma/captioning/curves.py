"""loss.png from metrics.jsonl: training loss, validation loss, and validation loss with shuffled images.

The gap between the last two is the image-reliance figure: two curves on top of each other mean the
decoder is captioning without looking. matplotlib is an optional extra (`pip install -e '.[plot]'`).
"""
import json
from pathlib import Path

from ..atomic import atomic_file


def plot(log: str | Path, png: str | Path) -> Path | None:
    """Returns the PNG's path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = [json.loads(line) for line in open(log)]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"], r["val_loss_shuffled_images"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train loss")
    if val:
        steps, own, shuffled = zip(*val)
        ax.plot(steps, own, "o-", label="val loss, own images")
        ax.plot(steps, shuffled, "s--", label="val loss, shuffled images")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / caption token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(png)
