"""Evaluation as a step of a run (training, deployment) and as its own command
(``thumbclf evaluate``): a predictions table in, metrics, plots and the report out."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from thumbclf.config import params_to_dict
from thumbclf.core import layout, table
from thumbclf.core.errors import ConfigError, DataError, OutputError
from thumbclf.outputs.confusion import cm_layout
from thumbclf.outputs.evaluate import (ReportSpec, thumb_loader, decisions_report,
                                       evaluate_table)
from thumbclf.workflows.run import prepare_output
from thumbclf.core.logs import setup_logging

log = logging.getLogger(__name__)


def run_thumb_loader(params):
    """Gallery images for a run: slide thumbnails come from its cache, not from the slides."""
    return thumb_loader(slide_size=params.slide_thumbnail_size, slide_cache=params.slide_cache,
                         slide_budget_s=params.slide_budget_s)


def evaluate_run(folder: Path, table: pd.DataFrame, *, classes, params, kind: str, sample_set,
                 split_df, failures: int = 0, extra_sections=(), notes=(), advice=(),
                 histories: dict[str, pd.DataFrame] | None = None) -> dict[str, Any]:
    """Evaluation after training or a labelled deploy, with the run's settings."""
    order, xt, yt = cm_layout(classes, params.cm_sortlabels, params.cm_xlabels,
                              params.cm_ylabels, params.source)
    split_named = None
    if split_df is not None:
        split_named = split_df.assign(CLASSIFICATION=[sample_set.samples[i].label
                                                      for i in split_df["position"]])
    titles = {"cross-validation": "Cross-validation (out-of-fold test predictions)",
              "validation": "Full training (validation split: used for early stopping, so optimistic)",
              "deploy": "Deployment on labelled data"}
    spec = ReportSpec(order=order, xt=xt, yt=yt, resamples=params.bootstrap, seed=params.seed,
                      title=f"thumbclf — {params.source.stem}", kind=titles.get(kind, kind),
                      params=params_to_dict(params), extra_sections=extra_sections, notes=notes,
                      thumbs=run_thumb_loader(params), review=folder,
                      sorted_into=sorted_folder(params, folder), advice=advice)
    return evaluate_table(table, list(classes), folder, spec, threshold=None,
                          histories=histories or {}, split_df=split_named, failures=failures)


def sorted_folder(params, folder: Path) -> Path | None:
    """Where a deploy copied the slides by decision (sortThumbs), or None."""
    return folder / layout.SORTED if getattr(params, "sort_thumbs", False) else None


def summarise_decisions(folder: Path, table: pd.DataFrame, *, classes, params, failures: int,
                        extra_sections=(), notes=(), advice=()) -> None:
    """Deploy without labels: the distribution of decisions, as a table, a plot and a report."""
    spec = ReportSpec(title=f"thumbclf — {params.source.stem}", params=params_to_dict(params),
                      extra_sections=extra_sections, notes=notes,
                      thumbs=run_thumb_loader(params), sorted_into=sorted_folder(params, folder),
                      advice=advice)
    decisions_report(folder, table, spec, classes=classes, failures=failures)


def evaluate_file(predictions: Path, *, threshold: float | None = None,
                  output: Path | None = None, bootstrap: int = 1000, seed: int = 1,
                  quiet: bool = False, debug: bool = False) -> Path:
    """Recompute metrics, plots and report from a predictions table; return the folder."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ConfigError(f"--threshold must be between 0 and 1; got {threshold}")
    df, classes = table.read(predictions)
    if table.LABEL not in df.columns:
        raise DataError(f"{predictions}: no CLASSIFICATION column; evaluation needs labels")
    if table.ERROR in df.columns:
        df = df[df[table.ERROR].fillna("") == ""]
    if df.empty:
        raise DataError(f"{predictions}: no rows to evaluate (only a header, or every row has "
                        "an error)")
    unknown = sorted(set(df[table.LABEL]) - set(classes))
    if unknown:
        log.warning("%s: labels without a probability column (counted as errors): %s",
                    predictions, ", ".join(unknown))
    suffix = f"-{threshold:g}" if threshold is not None else ""
    out = output or predictions.parent / f"evaluation{suffix}"
    if out.is_dir() and any(out.iterdir()):  # evaluate has no --resume: say what it has
        raise OutputError(f"{out}: holds an earlier evaluation; thumbclf never overwrites one. "
                          "Use --output NEW_FOLDER (or --threshold T, which writes "
                          "evaluation-T)")
    with prepare_output(out, resume=False):
        setup_logging(out, quiet=quiet, debug=debug)
        order, xt, yt = cm_layout(classes, None, None, None, predictions)
        spec = ReportSpec(order=order, xt=xt, yt=yt, resamples=bootstrap, seed=seed,
                          title=f"thumbclf — {predictions.name}",
                          kind="Evaluation of a predictions table",
                          params={"predictions": str(predictions), "threshold": threshold},
                          review=predictions.parent)
        evaluate_table(df, classes, out, spec, threshold=threshold)
    return out
