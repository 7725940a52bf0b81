"""``thumbclf merge RESULTS`` (issue 30): the shards of a deploy joined into the one results
folder a single deploy would have written.

Every shard must have finished with the same model files, the same settings and the same
input list, and the shares must cover every input once. Their rows are put back in input order
(the same ``predictions.csv``: rows, order, values), then the deploy's own steps after
prediction run on it: sorted copies, exported thumbnails, Grad-CAM, evaluation and the report.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import yaml

from thumbclf.config import DEPLOY
from thumbclf.config.rules import validate
from thumbclf.core import layout
from thumbclf.core import table as table_io
from thumbclf.core.errors import DataError
from thumbclf.core.files import atomic_csv, atomic_text
from thumbclf.workflows import shards

log = logging.getLogger(__name__)


def check_shards(results: Path) -> list[tuple[Path, dict]]:
    """Every shard folder with its record, in order; DataError naming the missing, unfinished
    or disagreeing shards."""
    found = layout.shard_folders(results)
    if not found:
        raise DataError(f"{results}: no shard folders ({layout.SHARDS}/I-of-N/); deploy with "
                        "--shard I/N (or as a SLURM array) into this --output first")
    counts = sorted({n for _, n, _ in found})
    if len(counts) > 1:
        raise DataError(f"{results}: shards of {' and '.join(map(str, counts))} shares are mixed "
                        f"in {layout.SHARDS}/; keep the folders of one split")
    n = counts[0]
    have = {i: p for i, _, p in found}
    missing = [f"{i}/{n}" for i in range(1, n + 1) if i not in have]
    unfinished = [f"{i}/{n}" for i, p in sorted(have.items()) if not shards.is_finished(p)]
    problems = []
    if missing:
        problems.append(f"shard{'s' * (len(missing) > 1)} {', '.join(missing)} never ran")
    if unfinished:
        problems.append(f"shard{'s' * (len(unfinished) > 1)} {', '.join(unfinished)} did not "
                        "finish (running, interrupted or failed: see its run.log)")
    if problems:
        raise DataError(f"{results}: {'; '.join(problems)}; run them (re-submit the array: "
                        "finished shards are skipped), then merge again")
    out = [(have[i], shards.read_record(have[i])) for i in range(1, n + 1)]
    _check_agree(results, out)
    return out


def _same(folder: Path, name: str) -> str:
    try:
        return (folder / name).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError:
        return ""


def _check_agree(results: Path, found: list[tuple[Path, dict]]) -> None:
    first, rec0 = found[0]
    config0 = yaml.safe_load(_same(first, layout.CONFIG)) or {}
    config0.pop("source", None)
    for folder, rec in found[1:]:
        what = []
        if rec.get("inputs_sha256") != rec0.get("inputs_sha256"):
            what.append("input list")
        if _same(folder, layout.MODELS) != _same(first, layout.MODELS):
            what.append(f"model files ({layout.MODELS})")
        config = yaml.safe_load(_same(folder, layout.CONFIG)) or {}
        config.pop("source", None)
        if config != config0:
            keys = sorted(k for k in set(config) | set(config0) if config.get(k) != config0.get(k))
            what.append(f"settings ({', '.join(keys)})")
        if what:
            name = folder.relative_to(results)
            raise DataError(f"{results}: shard {name} ran with another {' and another '.join(what)} "
                            f"than {first.relative_to(results)}; deploy it again with the same "
                            "experiment, models and inputs")
    positions = sorted(p for _, rec in found for p in rec["positions"])
    if positions != list(range(int(rec0["inputs"]))):
        raise DataError(f"{results}: the shards' shares do not cover the {rec0['inputs']} inputs "
                        "once each (the inputs' sizes changed between shards?); deploy the "
                        "shards again into a new --output")


def params_of(results: Path, first: Path, record: dict):
    """The deploy's params, rebuilt from a shard's config.yaml and the keys its run was given
    (so that defaults the model decides stay undecided), with ``results`` as the output."""
    config = yaml.safe_load((first / layout.CONFIG).read_text())
    copies = sorted(first.glob("experiment.*"))
    source = copies[0] if copies else first / layout.CONFIG
    raw = {k: config[k] for k in record.get("given", []) if k in config}
    params = validate(raw, workflow=DEPLOY, source=source, output=results, base=Path("/"))
    return params


def merged_table(found: list[tuple[Path, dict]], classes: list[str]) -> pd.DataFrame:
    """The shards' predictions in input order, typed as a single deploy's table is."""
    parts, columns = [], []
    for folder, rec in found:
        df = table_io.read_csv(folder / layout.PREDICTIONS)
        if len(df) != len(rec["positions"]):
            raise DataError(f"{folder / layout.PREDICTIONS}: {len(df)} rows for a share of "
                            f"{len(rec['positions'])} inputs; deploy this shard again")
        df.index = rec["positions"]
        parts.append(df)
        for c in df.columns:  # the columns in the order a single deploy writes them
            if c not in columns:
                after = [d for d in df.columns[:list(df.columns).index(c)] if d in columns]
                columns.insert(columns.index(after[-1]) + 1 if after else 0, c)
    table = pd.concat(parts).sort_index().reindex(columns=columns)
    numeric = [*classes, *(table_io.NUMERIC_COLUMNS & set(columns))]
    for c in columns:
        if c in numeric:
            table[c] = pd.to_numeric(table[c], errors="coerce")
            if c in table_io.READ_INT_COLUMNS:
                table[c] = table[c].astype("Int64")
        else:
            table[c] = table_io.text(table[c].fillna(""), table.index)
    return table.reset_index(drop=True)


def merge(results: Path, *, quiet: bool = False) -> Path:
    """Join the finished shards of ``results`` into it, as a single deploy would have written
    it; return the folder."""
    from thumbclf.core.logs import setup_logging
    from thumbclf.core.privacy import keep_caches_in
    from thumbclf.workflows import deploy
    from thumbclf.workflows.run import prepare_output

    results = Path(results).absolute()
    found = check_shards(results)
    params = params_of(results, *found[0])
    if deploy.finished(results):
        raise DataError(f"{results}: merged already (predictions.csv and report.html are "
                        "complete); nothing to do")
    keep_caches_in(params.cache_root)
    with prepare_output(results, resume=True):
        setup_logging(results, quiet=quiet)
        log.info("thumbclf merge: %d shards -> %s", len(found), results)
        models = deploy.load_models(params)
        table = merged_table(found, list(models[0].classes))
        atomic_csv(table, results / layout.PREDICTIONS)
        atomic_text(json.dumps(_timings(found), indent=1), results / layout.TIMINGS)
        return deploy.run(params, resume=True, progress=not quiet)


def _timings(found: list[tuple[Path, dict]]) -> dict:
    per = []
    for folder, _ in found:
        try:
            per.append(json.loads((folder / layout.TIMINGS).read_text()))
        except (OSError, ValueError):
            per.append({})
    notes = sorted({str(t.get("inference", "not recorded")) for t in per})
    return {"predict_seconds": round(sum(float(t.get("predict_seconds", 0)) for t in per), 3),
            "images": sum(int(t.get("images", 0)) for t in per), "shards": len(found),
            "inference": notes[0] if len(notes) == 1 else "; ".join(notes)}
