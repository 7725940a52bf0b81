"""The results folder's layout: every path a run builds or parses, and names made from data.

Nothing else joins a label, a file name or a fold number to a path. Data (class names,
decisions, file and slide names) becomes a path component only through ``safe_component``,
so a label such as ``../../x`` can never write outside the results folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from pathlib import Path, PureWindowsPath

MAX_COMPONENT_BYTES = 120  # well below every file system's 255-byte limit, room for suffixes
_UNSAFE = re.compile(r'[\\/:*?"<>|\x00-\x1f\x7f-\x9f\ud800-\udfff]')  # surrogates: undecodable names
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}

# files of a results folder
CONFIG = "config.yaml"
RUN_LOG = "run.log"
LOCK = ".thumbclf.lock"
SPLITS = "splits.csv"
PREDICTIONS = "predictions.csv"
PARTIAL = "predictions.partial.csv"
INPUTS = "inputs.csv"  # deploy: the inputs by position, to check a resume against
MODELS = "models.csv"  # deploy: the model files and their sha256, to check a resume against
ADAPTED_BN = "adapted_bn"  # deploy with adapt_bn: re-estimated BatchNorm statistics, looks
REPORT = "report.html"
GRADCAM_INDEX = "gradcam/index.csv"  # PATH -> its Grad-CAM overlay (relative to the folder)
REVIEW = "review"  # thumbclf review: the page, its previews and the journal of corrections
REVIEW_PAGE = "index.html"
REVIEW_JOURNAL = "journal.jsonl"
REVIEWED = "reviewed_predictions.csv"  # thumbclf review --apply: the model's and the reviewed class
MODEL = "model.pt"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.csv"
TIMINGS = "timings.json"  # seconds per step, images/s, peak memory, the inference engine
METRICS_JSON = "metrics.json"  # every figure of the report, per scope (all, each fold)
METRICS_CSV = "metrics.csv"  # the same figures as rows (scope, metric, value, CI)
CONFUSION = "confusion_matrix.csv"
CONFUSION_NORMALISED = "confusion_matrix_normalised.csv"
DECISIONS = "decisions.csv"  # deploy without labels: images per decision
PLOTS = "plots"  # the report's figures
SORTED = "sorted"  # deploy with sortThumbs: copies by decision
THUMBNAILS = "thumbnails"  # deploy with export_thumbnails: rendered slide thumbnails
SSL_CHECKPOINT = "ssl_checkpoint.pt"  # pretrain: the self-supervised backbone
FULL = "full"  # the folder of full training (fold 0)
SHARDS = "shards"  # deploy --shard I/N: shards/I-of-N/, one deploy folder per share (issue 30)
SHARD_RECORD = "shard.json"  # in a shard folder: its share of the inputs, finished or not
GRADCAM = "gradcam"  # Grad-CAM overlays: gradcam/<decision>/
# the report's figures, in PLOTS
FIG_CONFUSION = "confusion_matrix.png"
FIG_ROC = "roc_curves.png"
FIG_ACCURACY = "accuracy_vs_threshold.png"
FIG_RELIABILITY = "reliability.png"
FIG_TRAINING = "training_curves.png"
FIG_ERRORS = "gallery_errors.png"
FIG_UNDECIDED = "gallery_undecided.png"
FIG_NO_TISSUE = "gallery_no_tissue.png"
FIG_UNFAMILIAR = "gallery_unfamiliar.png"
FIG_DECISIONS = "decisions.png"
FIG_GRADCAM = "gradcam.png"
FIG_PRETRAIN_LOSS = "loss_curve.png"
CACHE_FOLDER = "thumbclf-cache"  # the default cache folder, beside the results folders
SLIDE_THUMBNAILS = "slides"  # the cache folder's subfolder of rendered slide thumbnails
CACHE_TAG = "CACHEDIR.TAG"  # https://bford.info/cachedir/: marks the shared cache folder
CACHE_TAG_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                  "# This file marks a thumbclf cache folder (decoded images, slide thumbnails).\n"
                  "# thumbclf never reads images from it as input; it can be deleted at any time.\n")

MEANINGS: dict[str, str] = {  # what each name holds (the docs' results-folder page)
    "config.yaml": "the resolved params, every default filled in",
    "experiment.<ext>": "a verbatim copy of the experiment file (`experiment.yaml` for an "
                        "experiment given to the Python API as a dict)",
    "run.log": "everything the run logged, at DEBUG level (the console shows INFO)",
    ".thumbclf.lock": "held while a run works in the folder: its process id and start time",
    "timings.json": "seconds per step, images/s, peak memory, whether freed memory was kept "
                    "for the next batch, Ray's start-up, and which inference engine and "
                    "precision computed (read by `bench/`)",
    "predictions.csv": "the predictions table (training: the pooled out-of-fold predictions; "
                       "deploy: every input); see [Predictions table](predictions-table.md)",
    "metrics.json": "every number of the evaluation (pooled and per fold), with 95% "
                    "confidence intervals",
    "metrics.csv": "the same numbers as flat rows: scope, metric, class, value, CI",
    "confusion_matrix.csv": "counts: true classes by decisions, Undecided included",
    "confusion_matrix_normalised.csv": "the same, each row divided by its total",
    "report.html": "the self-contained report (images embedded; opens offline); a deploy is "
                   "finished when it is written",
    PLOTS: "figures (PNG): " + ", ".join(Path(f).stem for f in (
        FIG_ROC, FIG_CONFUSION, FIG_ACCURACY, FIG_RELIABILITY, FIG_TRAINING, FIG_ERRORS,
        FIG_UNDECIDED, FIG_NO_TISSUE, FIG_UNFAMILIAR, FIG_GRADCAM)) + f"; without labels: "
        f"{Path(FIG_DECISIONS).stem}; pretraining: {Path(FIG_PRETRAIN_LOSS).stem}",
    FIG_ROC: "in `plots/`: one-vs-rest ROC curve per class, AUROC in the legend (labelled runs)",
    FIG_CONFUSION: "in `plots/`: the confusion matrix, counts in the cells, colours by row",
    FIG_ACCURACY: "in `plots/`: accuracy among decided slides and coverage against the threshold",
    FIG_RELIABILITY: "in `plots/`: the reliability diagram, accuracy against confidence per bin",
    FIG_TRAINING: "in `plots/`: loss and accuracy per epoch for every fold, the kept epoch marked",
    FIG_ERRORS: "in `plots/`: the most confident errors (labelled runs)",
    FIG_UNDECIDED: "in `plots/`: Undecided slides with their best guess",
    FIG_NO_TISSUE: "in `plots/`: slides Undecided for no tissue",
    FIG_UNFAMILIAR: "in `plots/`: the most unfamiliar slides",
    FIG_DECISIONS: "in `plots/`, deploy without labels: how many slides got each decision",
    FIG_GRADCAM: "in `plots/`: a grid of Grad-CAM overlays (with `gradcam`)",
    FIG_PRETRAIN_LOSS: "in `plots/`, pretraining: the self-supervised loss per epoch",
    GRADCAM: "`gradcam/<decision>/`: one Grad-CAM overlay per selected slide",
    "splits.csv": "training: every image's fold and role (train, val, test), written once and "
                  "reused by `--resume`",
    "model.pt": "a trained model, self-describing; `torch.load(path, weights_only=True)` "
                "reads it",
    "history.csv": "one row per epoch (training: losses, accuracies, learning rate, seconds, "
                   "images/s, best so far; pretraining: loss, learning rate, momentum, images, "
                   "seconds, images/s)",
    "checkpoint.pt": "the state to resume from, rewritten every epoch while a fold (or a "
                     "pretraining) is unfinished, deleted when it finishes",
    "full": "full training (`trainFull`): the folder of its history and validation "
            "predictions",
    "inputs.csv": "deploy: the inputs by position, so that `--resume` finds the same ones",
    "predictions.partial.csv": "deploy: the rows predicted so far, appended batch by batch; "
                               "`--resume` predicts only what is missing",
    "adapted_bn": "deploy with `adapt_bn`: each model's re-estimated BatchNorm statistics and "
                  "the looks of the images adapted to (reused by `--resume`; the model files "
                  "are not changed)",
    "sorted": "deploy with `sortThumbs`: `sorted/<class or Undecided>/`, copies (never moves)",
    "thumbnails": "deploy with `export_thumbnails`: the rendered slide thumbnails (PNG)",
    "decisions.csv": "deploy without labels: how many images got each decision",
    "ssl_checkpoint.pt": "pretraining: the backbone weights and their description; "
                         "`modelAdr` for `SSL: true`",
    "evaluation": "`thumbclf evaluate`'s results folder beside the table (`evaluation-T/` with "
                  "`--threshold T`)",
    CACHE_FOLDER: "the cache folder, beside the results folders (the key "
                      "[`cache_dir`](keys.md#cache_dir) moves it), shared by the runs next to "
                      "it: rendered slide thumbnails, the disk-mode decoded-image cache, "
                      "inference-engine verdicts and conversions",
    "slides": "in the cache folder: rendered slide thumbnails (PNG), keyed by slide path, "
              "size, modification time and thumbnail size",
    "gradcam/index.csv": "each slide's Grad-CAM overlay (PATH, overlay file), read by the "
                         "review page",
    "review": "`thumbclf review`: the review page, its previews and the journal of corrections",
    "index.html": "in `review/`: the self-contained review page (opens offline)",
    "journal.jsonl": "in `review/`: the append-only log of the corrections made on the served "
                     "page (`thumbclf review --serve`)",
    "reviewed_predictions.csv": "`thumbclf review --apply`: the predictions table with the "
                                "model's decision and the reviewed class side by side",
    "models.csv": "deploy: the model files and their sha256, so that `--resume` refuses other "
                  "models",
    "shards": "deploy with `--shard I/N` (or as a SLURM array): `shards/I-of-N/`, the deploy "
              "folder of each share of the inputs; `thumbclf merge` writes the results folder "
              "from them ([SLURM arrays](../how-to/slurm.md))",
    "shard.json": "in a shard folder: the share's positions in the full input list, that "
                  "list's digest, the keys given, and whether the shard finished",
    "CACHEDIR.TAG": "marks a cache folder, so that folder inputs never read it and backup "
                    "tools may skip it",
}



# ---------------------------------------------------------------------------- names from data


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def safe_component(text: str) -> str:
    """Data as one harmless path component: no separators, no '.'/'..', no leading dot, no
    control characters, at most MAX_COMPONENT_BYTES bytes. Changed names carry a hash of the
    original, so two different texts never give the same name."""
    raw = str(text)
    name = unicodedata.normalize("NFC", raw)
    name = _UNSAFE.sub("_", name).strip().lstrip(".").rstrip(". ")
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = "_" + name
    if name and name == raw and len(name.encode("utf-8", "surrogatepass")) <= MAX_COMPONENT_BYTES:
        return name
    tag = _short_hash(raw)
    encoded = name.encode("utf-8", "surrogatepass")[:MAX_COMPONENT_BYTES - 10]
    name = encoded.decode("utf-8", "ignore").rstrip(". ")
    return f"{name}~{tag}" if name else f"_~{tag}"


def component_map(texts) -> dict[str, str]:
    """Each text's safe component, unique even where a file system ignores case; the same
    whatever order the texts come in (issue 33: 'undecided' beside 'Undecided')."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for text in sorted({str(t) for t in texts}):
        name = safe_component(text)
        if name.casefold() in used:  # e.g. 'Tumor' and 'tumor' on macOS or Windows
            name = f"{name}~{_short_hash(text)}"
        used.add(name.casefold())
        out[text] = name
    return out


def safe_file_name(stem: str, suffix: str) -> str:
    """A file name from a data stem and a (trusted or data) suffix, e.g. ('slide 1', '.png')."""
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix or "") else ""
    return safe_component(stem) + suffix.lower() if suffix else safe_component(stem)


def unique_file(folder: Path, stem: str, suffix: str, source: str, taken: set[str]) -> Path:
    """A new path ``folder/<safe stem><suffix>`` not in ``taken`` (compared case-insensitively,
    as macOS and Windows do); a collision adds a hash of ``source``, then a counter."""
    base = safe_file_name(stem, suffix)
    candidates = [base]
    p = Path(base)
    tag = _short_hash(source)
    candidates += [f"{p.stem}__{tag}{p.suffix}"]
    candidates += [f"{p.stem}__{tag}-{i}{p.suffix}" for i in range(2, 10_000)]
    for name in candidates:
        key = str(folder / name).casefold()
        if key not in taken:
            taken.add(key)
            return folder / name
    raise AssertionError("no free name")  # 10,000 files of one name and hash: not reachable


def inside(root: Path, path: Path) -> bool:
    """True when ``path`` (resolved) lies inside ``root`` (resolved)."""
    root_r, path_r = root.resolve(), path.resolve()
    return path_r == root_r or root_r in path_r.parents


# ---------------------------------------------------------------------------- folds


def fold_dir(folder: Path, fold: int) -> Path:
    """The folder of one fold: fold_<k>/, or full/ for full training (fold 0)."""
    return folder / (FULL if fold == 0 else f"fold_{fold}")


def fold_label(fold: int) -> str:
    """How a fold is named in logs and reports."""
    return "full training" if fold == 0 else f"fold {fold}"


def fold_of(path: Path) -> int | None:
    """The fold number of a fold folder (full/ -> 0), or None for any other folder."""
    if path.name == FULL:
        return 0
    m = re.fullmatch(r"fold_(\d+)", path.name)
    return int(m.group(1)) if m else None


def fold_model(folder: Path, fold: int) -> Path:
    """A fold's model file; the final model of full training lies in the results folder."""
    return folder / MODEL if fold == 0 else fold_dir(folder, fold) / MODEL


def fold_predictions(folder: Path, fold: int) -> Path:
    """A fold's test predictions (full training: its validation predictions)."""
    return fold_dir(folder, fold) / ("val_predictions.csv" if fold == 0 else PREDICTIONS)


def fold_folders(folder: Path) -> list[tuple[int, Path]]:
    """(fold, folder) of every fold folder, in fold order."""
    found = [(fold_of(p), p) for p in folder.iterdir() if p.is_dir()] if folder.is_dir() else []
    return sorted((k, p) for k, p in found if k is not None)


def model_files_in(folder: Path) -> list[Path]:
    """The model files of a training results folder: model.pt, else fold_*/model.pt."""
    if (folder / MODEL).is_file():
        return [folder / MODEL]
    return [p / MODEL for k, p in fold_folders(folder) if k > 0 and (p / MODEL).is_file()]


def shard_folder(folder: Path, index: int, count: int) -> Path:
    """The folder of the ``index``-th (from 1) of ``count`` shares of a deploy."""
    return folder / SHARDS / f"{index}-of-{count}"


def shard_folders(folder: Path) -> list[tuple[int, int, Path]]:
    """(index, count, folder) of every shard folder of a results folder, in order."""
    found = []
    for p in sorted((folder / SHARDS).glob("*-of-*")):
        m = re.fullmatch(r"(\d+)-of-(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), int(m.group(2)), p))
    return sorted(found)


# ---------------------------------------------------------------------------- recognising folders


def is_results_folder(path: Path) -> bool:
    """A thumbclf results folder (marked by its config.yaml and run.log, or its lock)."""
    return ((path / CONFIG).is_file() and (path / RUN_LOG).is_file()) or (path / LOCK).is_file()


def is_cache_folder(path: Path) -> bool:
    """A cache folder (tagged with CACHEDIR.TAG, as thumbclf tags its own)."""
    return (path / CACHE_TAG).is_file()


def tag_cache_folder(path: Path) -> None:
    """Mark a cache folder so that folder inputs never read it (and backup tools skip it)."""
    tag = path / CACHE_TAG
    if not tag.exists():
        try:
            tag.write_text(CACHE_TAG_TEXT)
        except OSError:
            pass  # an unwritable cache is reported where it is written


def writable_or_creatable(path: Path) -> str | None:
    """None when ``path`` is (or could be made) a writable folder, else the reason why not."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"{probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None


WEB_SCHEMES = ("http", "https")  # a DICOMweb service, study or series (issue 30)


def web_url(path: Path | str) -> str | None:
    """The URL an input names (a DICOMweb service, study or series), None for a file. A URL
    kept in a Path has lost one slash of its '//' (``http:/host/...``): this puts it back, so
    the Path and the URL's text (as predictions.csv shows it) name the same input."""
    text = str(path)
    scheme, sep, rest = text.partition(":/")
    if not sep or scheme.lower() not in WEB_SCHEMES:
        return None
    return f"{scheme.lower()}://{rest.lstrip('/')}"


def input_text(path: Path | str) -> str:
    """An input as the review page and its journal name it: a DICOMweb URL as it is, a file's
    absolute path (links kept)."""
    return web_url(path) or os.path.abspath(path)


def input_stem(path: Path) -> str:
    """The name an input's copies take (a thumbnail, a sorted copy): the file's stem; a
    DICOMweb series' UID (its last component, dots and all)."""
    return path.name if web_url(path) is not None else path.stem


def to_local_path(text: str, base: Path) -> Path:
    """A path string from a file (POSIX or Windows style), resolved against ``base``; a URL
    (``web_url``) is kept as it is. On POSIX a backslash is a Windows separator only where the
    text is not an absolute POSIX path and names no file as written: it is a legal character of
    a Linux file name (issue 33)."""
    url = web_url(text)  # also as a Path writes it ('http:/host/...'): a saved config.yaml
    if url is not None:
        return Path(url)
    if os.sep == "/" and "\\" in text and not text.startswith("/"):
        literal = Path(os.path.expanduser(text))
        literal = literal if literal.is_absolute() else base / literal
        try:
            there = literal.exists()
        except OSError:  # a name too long
            there = False
        if not there:
            text = PureWindowsPath(text).as_posix()
    path = Path(os.path.expanduser(text))
    return path if path.is_absolute() else (base / path)

