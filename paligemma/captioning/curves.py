"""loss.png from metrics.jsonl: training loss, validation loss, and validation loss with shuffled images;
on a second axis the validation captions' CIDEr-D, with the best step (OUT/best) marked.

The gap between the two validation losses is the image-reliance figure: two curves on top of each
other mean the decoder is captioning without looking. matplotlib is an optional extra
(`pip install -e '.[plot]'`).
"""
from pathlib import Path

from ..atomic import atomic_file
from .run_folder import read_log


def plot(log: str | Path, png: str | Path) -> Path | None:
    """Returns the PNG's path, or None when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_log(log)  # a last line a kill cut short is left out
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
    handles = ax.get_legend_handles_labels()
    cider = [(r["step"], r["val_CIDEr-D"]) for r in records if "val_CIDEr-D" in r]
    if cider:
        ax2 = ax.twinx()
        ax2.plot(*zip(*cider), "^-", color="tab:purple", label="val CIDEr-D (captions)")
        best = max(cider, key=lambda c: c[1])  # the first of equals, as validation.Best keeps it
        ax2.plot(*best, "*", color="tab:purple", ms=14, label=f"best: step {best[0]}")
        ax2.set_ylabel("CIDEr-D")
        handles = [a + b for a, b in zip(handles, ax2.get_legend_handles_labels())]
    ax.legend(*handles, fontsize=8)
    fig.tight_layout()
    with atomic_file(png, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(png)
