"""Tables (pandas CSV, written atomically) and figures (matplotlib, Agg backend: never a window).

Figures written into a run folder:
    loss.png, accuracy.png, f1.png, dice.png   per-epoch curves, train vs validation
    figures/<case>.png                         image | reference overlay | prediction overlay
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from atomic import atomic_path  # noqa: E402

CURVES = {"loss": "loss", "accuracy": "accuracy", "f1": "f1_macro", "dice": "dice_mean"}


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write a CSV atomically (temporary file, then rename): never half-written."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)


def _save(figure: plt.Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(figure)


def plot_curves(history: pd.DataFrame, run_dir: Path) -> list[Path]:
    """One PNG per metric (loss, accuracy, f1, dice): train_* and val_* columns against epoch."""
    written = []
    for name, column in CURVES.items():
        figure, axis = plt.subplots(figsize=(6, 4))
        for split in ("train", "val"):
            key = f"{split}_{column}"
            if key in history and history[key].notna().any():
                points = history[["epoch", key]].dropna()  # validated epochs only
                axis.plot(points["epoch"], points[key], marker=".", label=split)
        axis.set_xlabel("epoch")
        axis.set_ylabel(column)
        axis.grid(alpha=0.3)
        axis.legend()
        path = run_dir / f"{name}.png"
        _save(figure, path)
        written.append(path)
    return written


def plot_overlay(
    image: np.ndarray, reference: np.ndarray | None, prediction: np.ndarray, title: str, path: Path
) -> None:
    """Central sagittal slice: image, reference overlay, prediction overlay, side by side.

    Arrays are (slices, height, width) = PIR numpy order: each slice shows S-I vertically and
    A-P horizontally. Labels are class indices (0 = background, transparent).
    """
    centre = image.shape[0] // 2
    panels = [("image", None), ("reference", reference), ("prediction", prediction)]
    panels = [(name, labels) for name, labels in panels if name == "image" or labels is not None]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 5))
    top = max(int(prediction.max()), 1 if reference is None else int(reference.max()), 1)
    for axis, (name, labels) in zip(np.atleast_1d(axes), panels, strict=True):
        axis.imshow(image[centre], cmap="gray")
        if labels is not None:
            shown = np.ma.masked_equal(labels[centre], 0)
            axis.imshow(shown, cmap="tab10", vmin=0, vmax=max(top, 9), alpha=0.45)
        axis.set_title(name)
        axis.axis("off")
    figure.suptitle(title)
    _save(figure, path)
