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


def draw_attention(tokens: list[str], weights, path: Path, title: str = "") -> None:
    """Write a PNG grid of attention heatmaps: one row per layer, one column per head, tokens on both axes.

    ``weights`` is ``(layers, heads, query, key)``; each heatmap's rows are the
    attending tokens (queries), its columns the tokens attended to (keys).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    weights = np.asarray(weights)
    layers, heads, n = weights.shape[0], weights.shape[1], weights.shape[2]
    cell = min(6.0, max(2.6, 0.16 * n + 1.0))  # inches per heatmap: room for the token labels
    font = 8 if n <= 24 else 6 if n <= 48 else 4
    fig, axes = plt.subplots(
        layers, heads, figsize=(cell * heads + 1.2, cell * layers + 0.8), dpi=110, squeeze=False, layout="constrained"
    )
    image = None
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer][head]
            image = ax.imshow(weights[layer, head], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer + 1}, head {head + 1}", fontsize=9)
            ax.set_xticks(range(n))
            ax.set_yticks(range(n))
            ax.set_xticklabels(tokens, rotation=90, fontsize=font)
            ax.set_yticklabels(tokens, fontsize=font)
            if head == 0:
                ax.set_ylabel("attending token (query)", fontsize=8)
            if layer == layers - 1:
                ax.set_xlabel("attended token (key)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
