"""The review page: one self-contained HTML file (no network, no CDN) over a predictions table,
with small preview pictures beside it in previews/.

The page's data travels as JSON in a non-executing script element; the page's script puts every
name, label and class on screen as text (textContent), never as HTML. Preview files are named by
a hash of the slide's path, so no data becomes part of a path or a URL.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
from PIL import Image

from thumbclf.core import layout
from thumbclf.core import table as table_io
from thumbclf.core.decide import UNDECIDED
from thumbclf.core.files import atomic_bytes, atomic_text

PREVIEWS = "previews"
SMALL, LARGE = 200, 800  # long side in pixels: the queue's cards, the large view
TOP = 3  # probabilities shown per slide


def preview_stem(path: str) -> str:
    """The preview files' name of a slide: a hash of its path (data never becomes a name)."""
    return hashlib.sha1(path.encode("utf-8", "surrogatepass")).hexdigest()[:20]


def preview_files(review: Path, path: str) -> dict[str, Path]:
    """Where the small and large preview and the Grad-CAM overlay of ``path`` are written."""
    stem = preview_stem(path)
    return {"s": review / PREVIEWS / f"{stem}-s.jpg", "b": review / PREVIEWS / f"{stem}-l.jpg",
            "g": review / PREVIEWS / f"{stem}-cam.jpg"}


def _jpeg(img: Image.Image, long_side: int) -> bytes:
    img = img.convert("RGB")
    img.thumbnail((long_side, long_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=82, optimize=True)
    return buf.getvalue()


def write_previews(img: Image.Image, files: Mapping[str, Path]) -> None:
    """The small and the large preview of one picture (each written once, atomically)."""
    for key, side in (("s", SMALL), ("b", LARGE)):
        if not files[key].is_file():
            atomic_bytes(_jpeg(img, side), files[key])


def write_overlay(img: Image.Image, target: Path) -> None:
    if not target.is_file():
        atomic_bytes(_jpeg(img, LARGE), target)


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def items(table: pd.DataFrame, classes: list[str], *, review: Path,
          paths: list[str] | None = None) -> list[dict]:
    """One record per table row, as the page reads it. ``paths`` (default: the table's PATH,
    made absolute) is what the page exports; previews are linked where their files exist."""
    paths = paths if paths is not None else [layout.input_text(p) for p in table[table_io.PATH]]
    probs = table[classes].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    probs = np.nan_to_num(probs, nan=0.0)
    order = np.argsort(-probs, axis=1, kind="stable")
    out = []
    column = lambda name: table_io.strings(table[name].fillna("")) if name in table else None  # noqa: E731
    decisions, reasons = column(table_io.DECISION), column(table_io.REASON)
    labels, errors = column(table_io.LABEL), column(table_io.ERROR)
    sources = column(table_io.SOURCE)  # the page filters by source (issue 28)
    unfam = table[table_io.UNFAMILIARITY].tolist() if table_io.UNFAMILIARITY in table else None
    for i, path in enumerate(paths):
        top = [[classes[j], round(float(probs[i, j]), 4)] for j in order[i, :TOP]]
        second = probs[i, order[i, 1]] if len(classes) > 1 else 0.0
        files = preview_files(review, str(table[table_io.PATH].iloc[i]))
        link = {k: f"{PREVIEWS}/{f.name}" if f.is_file() else None for k, f in files.items()}
        decision = decisions[i]
        reason = (reasons[i] if reasons else "") or ("low confidence" if decision == UNDECIDED else "")
        name = table_io.escape(Path(str(table[table_io.PATH].iloc[i])).name or path)
        out.append({
            "i": i, "p": path, "n": name,
            "d": decision, "r": reason, "m": round(float(probs[i, order[i, 0]] - second), 4),
            "c": round(float(probs[i, order[i, 0]]), 4),
            "u": _number(unfam[i]) if unfam else None, "t": top,
            "l": labels[i] if labels else "", "e": errors[i] if errors else "",
            "o": sources[i] if sources else "",
            # the name as tables write it, for the page's own export (a browser writes the
            # surrogates of a name that is not UTF-8 as U+FFFD: issue 33, item 16)
            **({"x": table_io.escape(path)} if table_io.escape(path) != path else {}),
            **link})
    return out


def _script_json(data) -> str:
    """JSON that cannot end its script element nor open markup (<, >, & escaped)."""
    text = json.dumps(data, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page_id(table_file: Path) -> str:
    """The page's storage key: the table's content (a copied folder keeps its corrections)."""
    return hashlib.sha1(table_file.read_bytes()).hexdigest()[:16]


def render(records: list[dict], classes: list[str], *, title: str, page: str) -> str:
    """The page's HTML."""
    template = resources.files("thumbclf.outputs").joinpath("review_page.html").read_text("utf-8")
    script = re.search(r"<script>(.*?)</script>", template, re.S).group(1)
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    data = {"id": page, "title": title, "classes": list(classes), "undecided": UNDECIDED,
            "items": records}
    fill = {"SCRIPT_HASH": f"'sha256-{digest}'", "TITLE": html.escape(title),
            "DATA": _script_json(data)}
    return re.sub(r"@@([A-Z_]+)@@", lambda m: fill[m.group(1)], template)  # one pass


def write(review: Path, records: list[dict], classes: list[str], *, title: str, page: str) -> Path:
    """review/index.html (written atomically; previews are written before it)."""
    target = review / "index.html"
    atomic_text(render(records, classes, title=title, page=page), target)
    return target
