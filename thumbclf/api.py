"""The Python API for notebooks and scripts: train, deploy, load a model and predict.

    import thumbclf
    folder = thumbclf.train("experiments/crc.yaml", max_epochs=20)
    model = thumbclf.load_model(folder)
    table = model.predict(["a.png", "b.jpg"])     # a DataFrame like predictions.csv

The command line (cli.py) runs the same functions; it alone turns the project's exceptions
(ThumbclfError and its subclasses, raised here unchanged) into exit codes and one-line messages.
Heavy modules (torch, pandas) are imported when a function runs, so ``import thumbclf`` stays fast.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from thumbclf.config.files import load_experiment
from thumbclf.core.errors import ConfigError, DataError, ReadFailure
from thumbclf.workflows.execute import execute

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from thumbclf.predict.executor import InferenceSpec

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- experiments


# the command line's words in the messages the API shares with it, as the API's arguments say them
API_WORDS = (("the same command plus --resume", "the same call with resume=True"),
             ("the training command plus --resume", "the training call with resume=True"),
             ("continue it with --resume", "continue it with resume=True"),
             ("Use --resume to continue it", "Use resume=True to continue it"),
             ("--output NEW_FOLDER", "output='NEW_FOLDER'"),
             ("another --output", "another output"), ("with --output", "with output="),
             ("--threshold T", "threshold=T"), ("--threshold", "threshold"),
             ("--resume", "resume=True"), ("--output", "output"))


@contextlib.contextmanager
def _api_words():
    """The project's errors, raised again with the API's names for the command line's flags."""
    from thumbclf.core.errors import ThumbclfError

    try:
        yield
    except ThumbclfError as exc:
        problems = list(exc.problems)
        for flag, argument in API_WORDS:
            problems = [p.replace(flag, argument) for p in problems]
        if problems == list(exc.problems):
            raise
        try:
            again = type(exc)(*problems)
        except TypeError:  # an error type with its own constructor: as it was
            raise exc from None
        raise again.with_traceback(exc.__traceback__) from None


def _run(workflow: str, experiment, output, resume: bool, quiet: bool, settings,
         shard=None) -> Path:
    from thumbclf.config.files import load_experiment
    from thumbclf.workflows.execute import execute, own_logging

    with _api_words():
        params, raw = load_experiment(experiment, workflow=workflow, output=output,
                                      settings=settings)
        with own_logging():
            if shard is not None:
                return execute(params, resume=resume, quiet=quiet, progress=not quiet, raw=raw,
                               shard=shard)
            return execute(params, resume=resume, quiet=quiet, progress=not quiet, raw=raw)


def train(experiment: str | os.PathLike | Mapping[str, Any], *,
          output: str | os.PathLike | None = None, resume: bool = False, quiet: bool = False,
          **settings: Any) -> Path:
    """Train as the experiment (file path or dict) says; return the results folder.

    ``settings`` override experiment keys, like ``--set``: ``train("e.yaml", foldNumber=5)``.
    ``output`` is the results folder (required for a dict; for a file it defaults to a folder
    named after the file, beside it). Errors are raised as ConfigError, DataError, ModelError
    or OutputError (all ThumbclfError) with the message the command line prints.
    """
    from thumbclf.config import TRAIN

    return _run(TRAIN, experiment, output, resume, quiet, settings)


def deploy(experiment: str | os.PathLike | Mapping[str, Any], *,
           output: str | os.PathLike | None = None, resume: bool = False, quiet: bool = False,
           shard: str | None = None, **settings: Any) -> Path:
    """Deploy as the experiment (file path or dict) says; return the results folder.

    The same options and errors as :func:`train`; e.g. ``deploy("d.yaml", modelAdr="runs/cv")``.
    ``shard="I/N"`` deploys the I-th of N shares into ``<output>/shards/I-of-N/`` (returned);
    :func:`merge` joins them.
    """
    from thumbclf.config import DEPLOY
    from thumbclf.workflows.shards import parse

    return _run(DEPLOY, experiment, output, resume, quiet, settings,
                parse(shard) if shard is not None else None)


def merge(results: str | os.PathLike, *, quiet: bool = False) -> Path:
    """Join the finished shards of a deploy into ``results``, as a single deploy writes it
    (``thumbclf merge RESULTS``); return the folder."""
    from thumbclf.workflows.execute import own_logging
    from thumbclf.workflows.merge import merge as merge_shards

    with own_logging():
        return merge_shards(Path(results), quiet=quiet)


def pretrain(experiment: str | os.PathLike | Mapping[str, Any], *,
             output: str | os.PathLike | None = None, resume: bool = False, quiet: bool = False,
             **settings: Any) -> Path:
    """Pretrain a backbone self-supervised (BYOL) on unlabelled slides as the experiment says;
    return the results folder. Train from its checkpoint with ``SSL=True, modelAdr=...``.

    The same options and errors as :func:`train`.
    """
    from thumbclf.config import PRETRAIN

    return _run(PRETRAIN, experiment, output, resume, quiet, settings)


def evaluate(predictions: str | os.PathLike, *, threshold: float | None = None,
             output: str | os.PathLike | None = None, bootstrap: int = 1000, seed: int = 1,
             quiet: bool = True) -> Path:
    """Recompute metrics, plots and the report from a predictions table (``thumbclf
    evaluate``); ``threshold`` decides again. Return the folder written (default: beside the
    table, evaluation[-T]). Imported as ``thumbclf.api.evaluate`` (``thumbclf.evaluate`` is
    the module of ``python -m thumbclf.evaluate``)."""
    from thumbclf.workflows.evaluate import evaluate_file
    from thumbclf.workflows.execute import own_logging

    with _api_words(), own_logging():
        return evaluate_file(Path(predictions), threshold=threshold,
                             output=Path(output) if output is not None else None,
                             bootstrap=bootstrap, seed=seed, quiet=quiet)


def init_experiment(path: str | os.PathLike, *, workflow: str | None = None) -> Path:
    """Write a commented experiment file to start from (YAML); never overwrite a file.

    ``workflow``: 'train', 'deploy' or 'pretrain' for only that workflow's keys; None for
    training and deployment.
    """
    from thumbclf.config import starter_text
    from thumbclf.core.errors import OutputError

    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ConfigError(f"{path}: thumbclf init writes a commented YAML file; name it .yaml "
                          "or .yml")
    text = starter_text(workflow)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise OutputError(f"{path}: already exists; thumbclf init never overwrites a file. "
                          "Choose another name") from None
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


# ---------------------------------------------------------------------------- models


def load_model(path: str | os.PathLike | Iterable[str | os.PathLike], **settings: Any) -> Classifier:
    """A trained model, ready to predict: a model.pt, a list of them, or a training results folder
    (its fold models are averaged), exactly as ``modelAdr`` takes them.

    ``settings`` are the deploy keys that matter for prediction: batch_size,
    prediction_threshold, tta, device, num_workers, target_labels and model_name (prototype
    models), max_image_pixels, slide_thumbnail_size, slide_budget_s, cache_dir.
    """
    from thumbclf.config import DEPLOY, validate
    from thumbclf.config.files import override, plain
    from thumbclf.core.decide import threshold_in_force
    from thumbclf.nn.training import pick_device
    from thumbclf.predict.engines import prepare_runners
    from thumbclf.workflows.deploy import load_models
    from thumbclf.workflows.run import inference_spec

    paths = plain(path) if isinstance(path, (str, os.PathLike)) else [plain(p) for p in path]
    raw = override({}, {**settings, "modelAdr": paths})
    # the settings, checked by the key table's rules as a deploy's are; no images (predict()
    # names them) and no results folder: the output only places the default cache folder
    # (converted engines, their verdicts) beside the first model, never in the parent of the
    # current folder
    first = Path(paths if isinstance(paths, str) else (paths or ["."])[0]).absolute()
    params = validate(raw, workflow=DEPLOY, source=Path("load_model()"), output=first,
                      base=Path.cwd(), need=("model_path",))
    models = load_models(params)
    chosen = threshold_in_force(given=params.prediction_threshold,
                                stored=[m.threshold for m in models])
    device = pick_device(params.device)
    spec = inference_spec(params)
    # no deploy images yet: verified on verify_data or the model's own validation split
    runners, _ = prepare_runners(models, spec, None, device, chosen.value)
    return Classifier(spec, models, chosen.value, chosen.reason, device, runners)


@dataclasses.dataclass
class Classifier:
    """Loaded model(s) plus how to feed them; ``predict`` gives a predictions table."""

    spec: InferenceSpec
    models: list
    threshold: float
    threshold_reason: str
    device: Any
    runners: list

    def __repr__(self) -> str:
        files = ", ".join(str(m.path) for m in self.models)
        return (f"Classifier(classes={list(self.classes)}, threshold={self.threshold:g} "
                f"({self.threshold_reason}), models=[{files}])")

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names in output order (the probability columns of a predictions table)."""
        return self.models[0].classes

    def predict(self, images: Any, *, has_labels: bool | None = None,
                progress: bool = False) -> pd.DataFrame:
        """Predict ``images``; a DataFrame with the columns and values of predictions.csv.

        ``images``: a path (one image or slide, a table, or a folder), a list of paths and/or
        PIL images, one PIL image, or a DataFrame with a PATH column (and optionally
        CLASSIFICATION, PATIENT), read as a table file would be. Relative paths start at the
        current directory. ``has_labels``: keep the labels (CLASSIFICATION column); default:
        when a table has one; a folder with labels has one subfolder per class.
        ``progress``: show a progress bar. Nothing is written (but the cache folder's slide
        thumbnails and converted engines).
        """
        import pandas as pd
        from PIL import Image

        if isinstance(images, pd.DataFrame):
            return self._predict_samples(*self._frame_samples(images, has_labels), progress)
        if isinstance(images, (str, os.PathLike)):
            path = Path(images).absolute()
            if path.is_dir() or _is_table(path):
                return self._predict_samples(*self._discover(path, has_labels), progress)
            images = [path]
        elif isinstance(images, Image.Image):
            images = [images]
        items = list(images)
        if not items:
            raise DataError("predict: no images given")
        if any(isinstance(i, Image.Image) for i in items):
            return self._predict_pictures(items)
        bad = [i for i in items if not isinstance(i, (str, os.PathLike))]
        if bad:
            raise DataError(f"predict: images must be paths or PIL images; got a "
                            f"{type(bad[0]).__name__}")
        from thumbclf.inputs.samples import Sample, SampleSet

        samples = tuple(Sample(Path(i).absolute()) for i in items)
        return self._predict_samples(SampleSet(samples, (), False, Path.cwd()), False, progress)

    # -- inputs

    def _discover(self, path: Path, has_labels: bool | None):
        from thumbclf.core.table import LABEL
        from thumbclf.inputs.samples import discover, has_column, read_table

        if has_labels is None:  # a table: when it has labels; a folder: a flat folder
            has_labels = (_is_table(path) and path.is_file()
                          and has_column(read_table(path), LABEL))
        return discover(path, need_labels=has_labels), has_labels

    def _frame_samples(self, df, has_labels: bool | None):
        from thumbclf.core.table import LABEL
        from thumbclf.inputs.samples import has_column, samples_from_frame

        df = df.copy()
        df.columns = [str(c).strip() for c in df.columns]
        df = df.fillna("").astype(str)
        if has_labels is None:
            has_labels = has_column(df, LABEL)
        return samples_from_frame(df, source=Path("<DataFrame>"), base=Path.cwd(),
                                  need_labels=has_labels), has_labels

    # -- predicting

    def _predict_samples(self, sample_set, has_labels: bool, progress: bool) -> pd.DataFrame:
        """Files through the command line's own streaming, rows and table code, in memory."""
        from thumbclf.predict.stream import predict_table

        return predict_table(self.models, sample_set,
                             dataclasses.replace(self.spec, progress=progress),
                             threshold=self.threshold, device=self.device,
                             has_labels=has_labels, runners=self.runners)

    def _predict_pictures(self, items: list) -> pd.DataFrame:
        """In-memory pictures (and paths beside them), preprocessed as files are, through the
        command line's own rows and table (``predicted_rows``, ``table_of``)."""
        import numpy as np
        import torch
        from PIL import Image

        from thumbclf.core.errors import ImageReadError
        from thumbclf.core.table import InputColumns
        from thumbclf.inputs.decode import load_array, picture_array
        from thumbclf.predict.ensemble import ensemble_predict
        from thumbclf.predict.stream import predicted_rows, read_rows, row_errors, table_of

        prep = self.models[0].prep
        names, arrays, errors = [], [], []
        for item in items:
            if isinstance(item, Image.Image):
                names.append(str(getattr(item, "filename", "") or ""))
                empty = 0 in item.size  # an error row, as an unreadable file gets
                arrays.append(None if empty else picture_array(item, prep))
                errors.append(f"a picture of {item.width} x {item.height} pixels: nothing to "
                              "classify" if empty else "")
                continue
            path = Path(item).absolute()
            names.append(str(path))
            try:
                arrays.append(load_array(path, prep))
                errors.append("")
            except ImageReadError as exc:
                arrays.append(None)
                errors.append(ReadFailure.of(exc))
        for m in self.models:
            m.model.to(self.device)
            if not m.legacy:
                m.model.to(memory_format=torch.channels_last)

        def batches():
            ok = [i for i, a in enumerate(arrays) if a is not None]
            for start in range(0, len(ok), self.spec.batch_size):
                rows = ok[start:start + self.spec.batch_size]
                x = torch.from_numpy(np.stack([arrays[i] for i in rows]))
                p, signals = ensemble_predict(self.models, self.runners, x, self.device,
                                              self.spec.tta)
                yield np.array(rows), p, signals, [""] * len(rows)
            failed = [i for i, a in enumerate(arrays) if a is None]
            if failed:
                yield (np.array(failed), np.zeros((len(failed), len(self.classes))), {},
                       [errors[i] for i in failed])

        rows = read_rows(predicted_rows(batches(), self.classes, self.threshold), len(names),
                         self.classes)
        inputs = InputColumns(paths=names, errors=list(row_errors(rows)))
        return table_of(rows, inputs, self.classes, self.threshold)


def _is_table(path: Path) -> bool:
    from thumbclf.inputs.samples import TABLE_SUFFIXES

    return path.suffix.lower() in TABLE_SUFFIXES


# ---------------------------------------------------------------------------- review


def review(results: str | os.PathLike, *, quiet: bool = True) -> Path:
    """Write the review page of a deploy or training results folder (``review/index.html``,
    with its previews); return the page's path. ``thumbclf review RESULTS`` does the same."""
    from thumbclf.workflows.review import write_review

    return write_review(_folder_arg(results, "review"), progress=not quiet)


def apply_corrections(results: str | os.PathLike,
                      corrections: str | os.PathLike | Iterable[str | os.PathLike]) -> Path:
    """Apply corrections tables to a results folder: ``reviewed_predictions.csv`` and copies
    under ``sorted/<reviewed class>/``; return the table's path (``thumbclf review RESULTS
    --apply CORRECTIONS``)."""
    from thumbclf.workflows.review import apply

    folder = _folder_arg(results, "apply_corrections")
    if isinstance(corrections, (str, os.PathLike)):
        tables = [corrections]
    elif isinstance(corrections, Iterable) and not hasattr(corrections, "columns"):
        tables = list(corrections)
    else:
        tables = [None]
    if not tables or not all(isinstance(t, (str, os.PathLike)) for t in tables):
        raise ConfigError(f"apply_corrections: corrections must be the path of a corrections "
                          f"table (or a list of paths); got {type(corrections).__name__} (save a "
                          "DataFrame with to_csv first)")
    return apply(folder, [Path(t) for t in tables])


def _folder_arg(results, what: str) -> Path:
    """A results folder given to the API as a path; ConfigError (issue 33) for anything else."""
    if not isinstance(results, (str, os.PathLike)):
        raise ConfigError(f"{what}: results must be the path of a results folder; got "
                          f"{type(results).__name__}")
    return Path(results)


__all__ = ["train", "deploy", "load_model", "Classifier", "init_experiment",
           "load_experiment", "execute", "review", "apply_corrections", "merge"]
