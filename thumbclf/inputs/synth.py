"""Synthetic slide thumbnails for the demo and the tests: six visually distinct slide types,
varied sizes, aspect ratios and orientations, on white glass. No download, seeded.

    python -m thumbclf.inputs.synth OUT_FOLDER [--per-class 10] [--seed 1] [--min-side 300]
                             [--max-side 900] [--format jpg|png] [--patients 0]
                             [--shift 0.0] [--classes Biopsy,Fat,...]

writes OUT_FOLDER/<class>/<name>.<ext> and OUT_FOLDER/labels.csv (PATH, CLASSIFICATION, PATIENT).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from thumbclf.core.table import LABEL, PATH, PATIENT

CLASSES = ("Biopsy", "Fat", "IHC", "LymphNode", "Resection", "TMA")
PINK, PURPLE, DARK = (232, 160, 200), (160, 90, 170), (105, 50, 125)


def _jitter(rng, colour, amount=18):
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def _blob(rng, cx, cy, r, n=28, rough=0.25):
    """An irregular closed polygon around (cx, cy)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * (1 + rough * rng.standard_normal(n)).clip(0.5, 1.6)
    return [(cx + rr * np.cos(a), cy + rr * np.sin(a)) for a, rr in zip(angles, radii)]


def _spots(draw, rng, box, colour, count, size):
    x0, y0, x1, y1 = box
    for _ in range(count):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        s = rng.uniform(0.5, 1.0) * size
        draw.ellipse([x - s, y - s, x + s, y + s], fill=_jitter(rng, colour, 12))


def draw_slide(kind: str, w: int, h: int, rng: np.random.Generator) -> Image.Image:
    """One synthetic thumbnail of slide type ``kind``."""
    img = Image.new("RGB", (w, h), _jitter(rng, (248, 248, 246), 4))
    d = ImageDraw.Draw(img)
    m = min(w, h)
    cx, cy = w / 2 + rng.uniform(-0.1, 0.1) * w, h / 2 + rng.uniform(-0.1, 0.1) * h
    if kind == "Resection":
        d.polygon(_blob(rng, cx, cy, 0.38 * m), fill=_jitter(rng, PINK))
        _spots(d, rng, (cx - 0.25 * m, cy - 0.25 * m, cx + 0.25 * m, cy + 0.25 * m), DARK,
               int(rng.integers(25, 60)), 0.03 * m)
    elif kind == "Biopsy":
        for _ in range(int(rng.integers(2, 6))):
            x = rng.uniform(0.15, 0.85) * w
            y = rng.uniform(0.2, 0.8) * h
            length, thick = rng.uniform(0.2, 0.35) * max(w, h), rng.uniform(0.015, 0.03) * m
            d.line([(x - length / 2, y), (x + length / 2, y + rng.uniform(-0.1, 0.1) * m)],
                   fill=_jitter(rng, PURPLE), width=max(2, int(thick)))
    elif kind == "LymphNode":
        for _ in range(int(rng.integers(1, 4))):
            x, y = rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h
            r = rng.uniform(0.12, 0.22) * m
            d.ellipse([x - r * 1.1, y - r * 1.1, x + r * 1.1, y + r * 1.1], fill=_jitter(rng, PINK))
            d.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(rng, (90, 70, 165)))
    elif kind == "Fat":
        d.polygon(_blob(rng, cx, cy, 0.4 * m, rough=0.15), fill=_jitter(rng, (240, 200, 220)))
        _spots(d, rng, (cx - 0.3 * m, cy - 0.3 * m, cx + 0.3 * m, cy + 0.3 * m), (252, 250, 250),
               int(rng.integers(60, 120)), 0.035 * m)
    elif kind == "IHC":
        d.polygon(_blob(rng, cx, cy, 0.33 * m), fill=_jitter(rng, (175, 190, 225)))
        _spots(d, rng, (cx - 0.22 * m, cy - 0.22 * m, cx + 0.22 * m, cy + 0.22 * m),
               (150, 90, 40), int(rng.integers(20, 50)), 0.03 * m)
    elif kind == "TMA":
        rows, cols = int(rng.integers(3, 6)), int(rng.integers(4, 8))
        r = 0.35 * min(w / cols, h / rows)
        for i in range(rows):
            for j in range(cols):
                if rng.random() < 0.1:
                    continue
                x, y = (j + 0.5) * w / cols, (i + 0.5) * h / rows
                d.ellipse([x - r, y - r, x + r, y + r], fill=_jitter(rng, PURPLE if (i + j) % 2 else PINK))
    else:
        raise ValueError(f"unknown slide type {kind!r}; known: {', '.join(CLASSES)}")
    img = img.filter(ImageFilter.GaussianBlur(radius=max(0.6, m / 500)))
    noise = rng.normal(0, 4, (h, w, 1))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# Another lab's optical-density mixing (stain hue), applied as OD @ (I + shift * LAB_MIX)
LAB_MIX = np.array([[0.10, -0.12, 0.08], [-0.10, 0.18, -0.06], [0.12, -0.04, 0.10]])


def other_lab(img: Image.Image, shift: float, rng: np.random.Generator) -> Image.Image:
    """The same slide as another lab would scan it, ``shift`` 0-1 (1: a strong but realistic
    difference): stain hue (optical densities mixed), stain strength (+35%), yellowish glass,
    scanner blur and sensor noise, each with a little slide-to-slide variation."""
    if shift <= 0:
        return img
    x = np.asarray(img, dtype=np.float64) / 255
    od = -np.log((x * 255 + 1) / 256)
    od = od @ (np.eye(3) + shift * LAB_MIX) * (1 + shift * rng.uniform(0.25, 0.45))
    x = (256 * np.exp(-np.clip(od, 0, None)) - 1) / 255
    x = x * (1 - shift * np.array([0.0, 0.03, 0.09]) * rng.uniform(0.8, 1.2))  # glass tint
    out = Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8))
    out = out.filter(ImageFilter.GaussianBlur(radius=shift * rng.uniform(1.0, 2.0)
                                              * min(img.size) / 300))
    noise = rng.normal(0, 7 * shift, (img.size[1], img.size[0], 3))
    return Image.fromarray(np.clip(np.asarray(out, np.float64) + noise, 0, 255).astype(np.uint8))


def generate(out: Path, *, per_class: int = 10, seed: int = 1, sides: tuple[int, int] = (300, 900),
             fmt: str = "jpg", classes=CLASSES, patients: int = 0, shift: float = 0.0) -> Path:
    """Write ``per_class`` thumbnails per class and labels.csv; return the table's path.
    ``sides``: the range of each long side, in pixels (both included); ``shift`` > 0: as another
    lab would have scanned them (other_lab)."""
    min_side, max_side = sides
    rng = np.random.default_rng(seed)
    rows = []
    for kind in classes:
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            long_side = int(rng.integers(min_side, max_side + 1))
            short = max(8, int(long_side / rng.uniform(1.0, 2.5)))
            w, h = (long_side, short) if rng.random() < 0.5 else (short, long_side)
            img = draw_slide(kind, w, h, rng)
            if shift > 0:  # its own generator: the slides are the same with or without it
                img = other_lab(img, shift, np.random.default_rng([seed, len(rows), 7]))
            name = f"slide_{kind.lower()}_{i:03d}.{fmt}"
            if fmt == "jpg":
                img.save(folder / name, quality=88)
            else:
                img.save(folder / name, compress_level=1)
            patient = f"P{rng.integers(0, patients):03d}_{kind}" if patients else ""
            rows.append((f"{kind}/{name}", kind, patient))
    table = out / "labels.csv"
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([PATH, LABEL] + ([PATIENT] if patients else []))
        for r in rows:
            writer.writerow(r if patients else r[:2])
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m thumbclf.inputs.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per-class", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--min-side", type=int, default=300)
    ap.add_argument("--max-side", type=int, default=900)
    ap.add_argument("--format", choices=("jpg", "png"), default="jpg")
    ap.add_argument("--patients", type=int, default=0, help="patients per class (0: no PATIENT column)")
    ap.add_argument("--shift", type=float, default=0.0,
                    help="another lab's stain, glass, blur and noise, 0-1 (0: none)")
    ap.add_argument("--classes", default=",".join(CLASSES),
                    help="comma-separated slide types to draw (leave one out to hold it out)")
    a = ap.parse_args(argv)
    classes = tuple(c for c in a.classes.split(",") if c)
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown:
        ap.error(f"--classes: unknown slide types {', '.join(unknown)}; known: {', '.join(CLASSES)}")
    table = generate(a.out, per_class=a.per_class, seed=a.seed, sides=(a.min_side, a.max_side),
                     fmt=a.format, patients=a.patients, classes=classes, shift=a.shift)
    print(f"wrote {a.per_class * len(classes)} thumbnails and {table}")


if __name__ == "__main__":
    main()
