"""Figures from predictions and metrics (matplotlib, Agg backend), written as PNG files."""

from __future__ import annotations

import functools
import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from thumbclf.core.decide import UNDECIDED  # noqa: E402
from thumbclf.core.errors import clean  # noqa: E402
from thumbclf.core.files import atomic_bytes  # noqa: E402
from thumbclf.outputs.metrics import Metrics  # noqa: E402
from thumbclf.core.table import LABEL

DPI = 110


def save_figure(fig, path: Path) -> Path:
    """Write a figure as PNG (atomically) and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    atomic_bytes(buf.getvalue(), path)
    return path


def roc_curves(df: pd.DataFrame, classes: list[str], metrics: Metrics, path: Path) -> Path:
    """One-vs-rest ROC curve per class on the full data, AUROC in the legend."""
    fig, ax = plt.subplots(figsize=(6.2, 6))
    y = df[LABEL].astype(str).to_numpy()
    aucs = {r["class"]: r for r in metrics.per_class}
    for c in classes:
        pos = y == c
        if pos.all() or not pos.any():
            continue
        fpr, tpr, _ = roc_curve(pos, df[c].to_numpy(dtype=float))
        r = aucs[c]
        ci = r["auroc_ci"]
        ci_text = f" [{ci[0]:.3f}-{ci[1]:.3f}]" if ci[0] is not None else ""
        ax.plot(fpr, tpr, lw=1.8, label=f"{c}: {r['auroc']:.3f}{ci_text} (n={r['n']})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity (false positive rate)",
           ylabel="sensitivity (true positive rate)", aspect="equal")
    macro = metrics.macro_auroc_ovr
    ax.set_title("ROC, one class vs rest" + (f" — macro AUROC {macro:.3f}" if macro else ""))
    ax.legend(loc="lower right", fontsize=8, title="AUROC [95% CI]", title_fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def selective_curve(metrics: Metrics, threshold: float, path: Path) -> Path:
    """Accuracy among decided slides and coverage against the threshold."""
    curve = pd.DataFrame(metrics.selective)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(curve["threshold"], curve["accuracy"], label="accuracy among decided", lw=2)
    ax.plot(curve["threshold"], curve["coverage"], label="coverage (share decided)", lw=2)
    ax.axvline(threshold, color="crimson", ls="--", lw=1.5, label=f"threshold in use ({threshold:.2f})")
    for t, name in ((metrics.threshold_for_95, "95%"), (metrics.threshold_for_99, "99%")):
        if t is not None:
            ax.axvline(t, color="grey", ls=":", lw=1)
            ax.text(t, 0.02, f" {name} acc.", rotation=90, fontsize=7, color="grey", va="bottom")
    ax.set(xlabel="probability threshold", ylabel="share", ylim=(0, 1.02), xlim=(0, 1),
           title=f"What the Undecided threshold costs and buys (AURC {metrics.aurc:.3f})"
           if metrics.aurc is not None else "Accuracy and coverage by threshold")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def reliability(metrics: Metrics, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin."""
    bins = pd.DataFrame(metrics.reliability)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="perfect calibration")
    if len(bins):
        width = bins["hi"] - bins["lo"]
        ax.bar(bins["lo"], bins["accuracy"], width=width, align="edge", alpha=0.6,
               edgecolor="black", label="accuracy in bin")
        ax.plot(bins["confidence"], bins["accuracy"], "o", color="black", ms=3)
        for _, b in bins.iterrows():  # how many slides stand behind each bar
            ax.text((b["lo"] + b["hi"]) / 2, min(b["accuracy"] + 0.02, 0.95), f"n={int(b['n'])}",
                    ha="center", fontsize=6, rotation=90)
    ece = metrics.ece
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (highest probability)",
           ylabel="accuracy", aspect="equal",
           title="Reliability" + (f" — ECE {ece:.3f}" if ece is not None else ""))
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def confusion_heatmap(cm: pd.DataFrame, xlabels: list[str], ylabels: list[str], path: Path,
                      title: str) -> Path:
    """Row-normalised colours with the counts written in the cells."""
    counts = cm.to_numpy()
    norm = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(xlabels), 0.9 + 0.7 * len(ylabels)))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{counts[i, j]}\n{norm[i, j]:.0%}", ha="center", va="center",
                    fontsize=8, color="white" if norm[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=35, ha="right")
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set(xlabel="decision", ylabel="true class", title=title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return save_figure(fig, path)


def training_curves(histories: dict[str, pd.DataFrame], path: Path) -> Path:
    """Loss and accuracy per epoch for every fold, best (kept) epoch marked."""
    k = len(histories)
    fig, axes = plt.subplots(2, k, figsize=(4.2 * k, 6.5), squeeze=False)
    for j, (name, h) in enumerate(histories.items()):
        best = h.loc[h["val_loss"].idxmin(), "epoch"] if len(h) else None
        for i, (metric, label) in enumerate((("loss", "loss"), ("accuracy", "accuracy"))):
            ax = axes[i, j]
            ax.plot(h["epoch"], h[f"train_{metric}"], "-o", ms=3, label="train")
            ax.plot(h["epoch"], h[f"val_{metric}"], "-o", ms=3, label="validation")
            if best is not None:
                ax.axvline(best, color="crimson", ls="--", lw=1, label=f"kept epoch {best}")
            ax.set(xlabel="epoch", ylabel=label, title=f"{name}: {label}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def image_grid(n: int):
    """A figure with n image panels, six per row, axes hidden."""
    cols = min(6, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


GALLERY_COLUMNS, CELL, PICTURE, CAPTION = 6, 250, 210, 60  # a row, a cell's width, an image's
# box, the caption's height (4 lines)
GALLERY_COLOURS = {"undecided": (255, 140, 0), "unlabelled": (105, 105, 105),
                   "wrong": (220, 20, 60), "right": (0, 0, 0)}


@functools.cache
def _font(size: int):
    """matplotlib's own DejaVu Sans (it ships with it), so the galleries read as the plots do."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _fit(text: str, font, width: int) -> str:
    """``text``, cut and ended with an ellipsis where it is wider than ``width`` pixels (the
    cut found by bisection: a label of 20,000 characters is data too)."""
    if font.getlength(text) <= width:
        return text
    short, long = 0, len(text)  # text[:short] + "…" fits; text[:long] + "…" does not
    while long - short > 1:
        mid = (short + long) // 2
        short, long = (mid, long) if font.getlength(text[:mid] + "…") <= width else (short, mid)
    return text[:short] + "…"


def _wrapped(text: str, font, width: int, most: int) -> list[str]:
    """``text`` in at most ``most`` lines no wider than ``width`` pixels, broken at spaces; a
    word too wide for a line, and the last line where text is left, end in an ellipsis."""
    lines: list[str] = []
    for word in text.split(" "):
        line = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(line) <= width:
            lines[-1] = line
        elif len(lines) > most:  # the rest is cut anyway
            break
        else:
            lines.append(_fit(word, font, width))
    if len(lines) > most:
        lines = lines[:most - 1] + [_fit(lines[most - 1] + "…", font, width)]
    return lines


def _picture(img):
    """A loader's thumbnail as an RGB image: uint8 as it is, floats as 0-1, other integers
    clipped to 0-255 (as matplotlib showed them; inputs/images.to_rgb reads a float image as
    0-255), one channel as grey; None for nothing or an empty array."""
    from PIL import Image

    arr = np.asarray(img)
    if arr.size == 0 or arr.ndim not in (2, 3):
        return None
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(arr.dtype, np.floating) else 1.0
        arr = np.clip(np.nan_to_num(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _cell(draw, sheet, it: dict[str, Any], x: int, y: int, thumb_loader) -> None:
    """One thumbnail with its caption (true label, decision and score) and its file name."""
    from PIL import Image

    label, decision = it["label"], it["decision"]
    colour = GALLERY_COLOURS["undecided" if decision == UNDECIDED else "unlabelled"
                             if not label else "wrong" if decision != label else "right"]
    score = it.get("note") or f"{it['prob']:.2f}"
    truth = f"true: {clean(label)}" if label else "unlabelled"
    lines = _wrapped(truth, _font(12), CELL - 12, 1) + _wrapped(
        f"→ {clean(decision)} ({score})", _font(12), CELL - 12, 3)
    for j, line in enumerate(lines):
        draw.text((x + CELL // 2, y + 2 + 15 * j), line, fill=colour, font=_font(12), anchor="ma")
    picture = _picture(thumb_loader(it["path"]))  # None: nothing to show
    if picture is not None:
        scale = PICTURE / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)),
                                  max(1, round(picture.height * scale))), Image.BILINEAR)
        sheet.paste(picture, (x + (CELL - picture.width) // 2,
                              y + CAPTION + (PICTURE - picture.height) // 2))
    name = _fit(clean(Path(it["path"]).name), _font(10), CELL - 12)
    draw.text((x + CELL // 2, y + CAPTION + PICTURE + 3), name, fill="black", font=_font(10),
              anchor="ma")


def gallery(items: list[dict[str, Any]], path: Path, title: str, thumb_loader) -> Path | None:
    """Small thumbnails with true label, decision and probability (most confident first), six
    to a row. Drawn with Pillow, not matplotlib: a figure of axes took 0.3-1 s a gallery, and
    its captions ran into each other."""
    if not items:
        return None
    from PIL import Image, ImageDraw

    rows, cols = -(-len(items) // GALLERY_COLUMNS), min(GALLERY_COLUMNS, len(items))
    height, top = CAPTION + PICTURE + 26, 34
    title = _fit(clean(title), _font(15), GALLERY_COLUMNS * CELL - 24)
    width = max(cols * CELL, round(_font(15).getlength(title)) + 24)
    sheet = Image.new("RGB", (width, top + rows * height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((width // 2, 8), title, fill="black", font=_font(15), anchor="ma")
    left = (width - cols * CELL) // 2  # a title wider than the cells: the cells centred
    for i, it in enumerate(items):
        _cell(draw, sheet, it, left + (i % GALLERY_COLUMNS) * CELL,
              top + (i // GALLERY_COLUMNS) * height, thumb_loader)
    buf = io.BytesIO()
    sheet.save(buf, format="png", compress_level=3)  # level 6: 2.4 times the time, 12% smaller
    atomic_bytes(buf.getvalue(), path)
    return path


def decision_bars(counts: pd.Series, path: Path, title: str) -> Path:
    """Bar chart of how many images got each decision."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * len(counts), 4))
    colours = ["#bbbbbb" if k == UNDECIDED else "#4a7ab8" for k in counts.index]
    ax.bar(range(len(counts)), counts.to_numpy(), color=colours)
    for i, v in enumerate(counts.to_numpy()):
        ax.text(i, v, str(v), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(counts)), counts.index, rotation=35, ha="right")
    ax.set(ylabel="images", title=title)
    return save_figure(fig, path)


def pretrain_loss(history: pd.DataFrame, path: Path, method: str = "BYOL") -> Path:
    """Self-supervised loss per epoch, with the learning rate on a second axis."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(history["epoch"], history["loss"], "-o", ms=3, lw=1.8, label=f"{method} loss")
    ax.set(xlabel="epoch", ylabel="loss (0 = the two views agree)",
           title=f"Self-supervised pretraining ({method}): loss per epoch")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(history["epoch"], history["lr"], color="grey", ls=":", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="grey")
    lines = ax.get_lines()[:1] + lr_ax.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path)
