"""The training curve: train and validation loss against optimizer steps."""

from __future__ import annotations

from pathlib import Path

from minigpt_cli.runs import atomic_path


def draw_training_curve(steps: list[tuple], history: list[dict], path: Path) -> None:
    """Write ``training_curve.png``: per-step train loss (and its moving average), validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if steps:
        x, y = np.array([step[:2] for step in steps], dtype=float).T
        ax.plot(x, y, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss (step)")
        window = max(1, len(y) // 50)
        if window > 1:
            smooth = np.convolve(y, np.ones(window) / window, mode="valid")
            ax.plot(x[window - 1 :], smooth, color="tab:blue", label=f"train loss ({window}-step mean)")
    val = [(r["global_step"], r["val_loss"]) for r in history]
    if val:
        vx, vy = zip(*val, strict=True)
        ax.plot(vx, vy, "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
