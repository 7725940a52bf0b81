"""The confusion matrix's row order and tick labels (cm_sortlabels, cm_xlabels, cm_ylabels)."""

from __future__ import annotations

from typing import Any

from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import ConfigError


def cm_problems(classes: list[str] | tuple[str, ...], sortlabels, xlabels, ylabels
                ) -> tuple[tuple[list[str], list[str], list[str]], list[str]]:
    """Confusion-matrix row order and tick labels, plus every inconsistency found."""
    classes = list(classes)
    order = list(sortlabels) if sortlabels else classes
    unknown = [c for c in order if c not in classes]
    missing = [c for c in classes if c not in order]
    problems = []
    if unknown:
        verb = "is" if len(unknown) == 1 else "are"
        problems.append(f"cm_sortlabels names {', '.join(unknown)}, which {verb} no class "
                        f"(classes: {', '.join(classes)})")
    if missing:
        problems.append(f"cm_sortlabels leaves out {', '.join(missing)}; list every class once")
    xt = list(xlabels) if xlabels else order + [UNDECIDED]
    if len(xt) == len(order):
        xt = xt + [UNDECIDED]
    if len(xt) != len(order) + 1:
        problems.append(f"cm_xlabels must have {len(order)} labels (or {len(order) + 1} with "
                        f"Undecided); got {len(xt)}")
    yt = list(ylabels) if ylabels else order
    if len(yt) != len(order):
        problems.append(f"cm_ylabels must have {len(order)} labels, one per class; got {len(yt)}")
    return (order, xt, yt), problems


def cm_layout(classes, sortlabels, xlabels, ylabels, source: Any = "experiment file"
              ) -> tuple[list[str], list[str], list[str]]:
    """Row/column order and tick labels of the confusion matrix; ConfigError if inconsistent."""
    layout, problems = cm_problems(classes, sortlabels, xlabels, ylabels)
    if problems:
        raise ConfigError(*(f"{source}: {p}" for p in problems))
    return layout
