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
import tempfile
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from thumbclf.core.errors import ConfigError, DataError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from thumbclf.config import DeployParams, Params

log = logging.getLogger(__name__)
DICT_SOURCE = Path("<experiment dict>")  # how error messages name an experiment given as a dict
EXPERIMENT_COPY = "experiment.yaml"  # a dict experiment is saved as this in its results folder


# ---------------------------------------------------------------------------- experiments


def _plain(value: Any) -> Any:
    """Python values as an experiment file would hold them: paths as strings, tuples as lists."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _override(raw: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Replace keys of ``raw`` by ``settings`` whatever their spelling, as ``--set`` does."""
    from thumbclf.config import SPELLINGS

    raw = dict(raw)
    for key, value in settings.items():
        canonical = SPELLINGS.get(key)
        if canonical is not None:
            for spelling in (canonical.name, *canonical.aliases):
                raw.pop(spelling, None)
        raw[key] = _plain(value)
    return raw


def load_experiment(experiment: str | os.PathLike | Mapping[str, Any], *, workflow: str,
                    output: str | os.PathLike | None = None,
                    settings: Mapping[str, Any] | None = None) -> tuple[Params, dict | None]:
    """Validated params from an experiment file or dict; also the dict itself (None for a file).

    A file is read like the command line reads it (relative paths start at its folder, the
    results folder defaults to one named after it, beside it). A dict is validated by the same
    rules; its relative paths start at the current directory and ``output`` must be given.
    """
    from thumbclf.config import read_experiment_file, validate

    out = Path(output).absolute() if output is not None else None
    if isinstance(experiment, Mapping):
        raw = _override({str(k): _plain(v) for k, v in experiment.items()}, settings or {})
        if out is None:
            raise ConfigError(f"{DICT_SOURCE}: output is required when the experiment is a dict "
                              "(the results folder to write), e.g. output='runs/my_run'")
        params = validate(raw, workflow=workflow, source=DICT_SOURCE, output=out, base=Path.cwd())
        return params, raw
    if not isinstance(experiment, (str, os.PathLike)):
        raise ConfigError(f"experiment must be the path of an experiment file or a dict of its "
                          f"keys; got a {type(experiment).__name__}")
    source = Path(experiment).absolute()
    raw = _override(read_experiment_file(source), settings or {})
    return validate(raw, workflow=workflow, source=source, output=out), None


def execute(params: Params, *, resume: bool = False, quiet: bool = False, debug: bool = False,
            progress: bool = True, raw: dict | None = None) -> Path:
    """Prepare the results folder, log into it and run the params' workflow; return the folder.

    ``raw``: the dict an experiment came from; it is saved as experiment.yaml in the results
    folder, which then stands for the experiment file (the copy beside config.yaml).
    """
    import yaml

    from thumbclf.config import TRAIN, WORKFLOW_OF
    from thumbclf.core.files import atomic_text
    from thumbclf.workflows.run import check_output, prepare_output, setup_logging

    workflow = WORKFLOW_OF[type(params)]
    if workflow == TRAIN:
        from thumbclf.workflows.train import preflight, run
    elif workflow == "pretrain":
        from thumbclf.workflows.pretrain import preflight, run
    else:
        # decoding workers share the cores with the model: idle OpenMP threads should sleep,
        # not spin (measured +10% on PNG thumbnails on 2 cores); read when torch loads
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from thumbclf.workflows.deploy import preflight, run
    from thumbclf.predict import distributed

    if distributed.active():  # torchrun: rank 0 owns the results folder, the others train along
        return _execute_ranks(params, workflow, resume=resume, quiet=quiet, debug=debug,
                              progress=progress)
    check_output(params.output, resume=resume)  # everything that can be checked before the
    preflight(params)  # first file is written: the folder, the inputs, weights, caches
    folder = params.output
    with prepare_output(folder, resume=resume):  # the folder is this run's until it returns
        if raw is not None:
            copy = folder / EXPERIMENT_COPY
            if not (resume and copy.is_file()):
                atomic_text(f"# given to thumbclf.{workflow}() as a dict; its relative paths "
                            f"start at {Path.cwd()}\n"
                            + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), copy)
            params = dataclasses.replace(params, source=copy)
        setup_logging(folder, quiet=quiet, debug=debug)
        log.info("thumbclf %s: %s -> %s", workflow, params.source, folder)
        return run(params, resume=resume, quiet=not progress)


def _execute_ranks(params: Params, workflow: str, *, resume: bool, quiet: bool, debug: bool,
                   progress: bool) -> Path:
    """``execute`` for one rank of a torchrun training (see distributed.py)."""
    from thumbclf.config import TRAIN
    from thumbclf.core.errors import ThumbclfError
    from thumbclf.predict import distributed
    from thumbclf.workflows.run import check_output, prepare_output, setup_logging

    where = f"{params.source}: "
    if workflow != TRAIN:
        raise ConfigError(f"{where}torchrun trains one model on several GPUs/processes; run "
                          "deploy as one process (or with executor: ray for many machines)")
    if params.executor == "ray":
        raise ConfigError(f"{where}executor: ray and torchrun do not combine; use torchrun for "
                          "one model on several GPUs, or executor: ray for folds in parallel")
    from thumbclf.workflows.train import preflight, run

    distributed.init(params.device)
    try:
        problem = None
        if distributed.is_main():
            try:
                check_output(params.output, resume=resume)
                preflight(params)
            except ThumbclfError as exc:
                problem = exc
        problem = distributed.share(problem)  # every rank stops on rank 0's error
        if problem is not None:
            raise problem
        if not distributed.is_main():  # no files, no console but errors, no progress bars
            setup_logging(None, quiet=True)
            logging.getLogger().handlers[-1].setLevel(logging.ERROR)
            return run(params, resume=resume, quiet=True)
        with prepare_output(params.output, resume=resume):
            setup_logging(params.output, quiet=quiet, debug=debug)
            log.info("thumbclf %s: %s -> %s (torchrun: %d processes)", workflow, params.source,
                     params.output, distributed.world_size())
            return run(params, resume=resume, quiet=not progress)
    finally:
        distributed.finish()


@contextlib.contextmanager
def _own_logging() -> Iterator[None]:
    """Leave the caller's logging as it was: remove the handlers a run adds (console, run.log)."""
    root = logging.getLogger()
    level, before = root.level, set(root.handlers)
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in before and getattr(h, "_thumbclf", False):
                root.removeHandler(h)
                h.close()
        root.setLevel(level)


def _run(workflow: str, experiment, output, resume: bool, quiet: bool, settings) -> Path:
    params, raw = load_experiment(experiment, workflow=workflow, output=output, settings=settings)
    with _own_logging():
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
           **settings: Any) -> Path:
    """Deploy as the experiment (file path or dict) says; return the results folder.

    The same options and errors as :func:`train`; e.g. ``deploy("d.yaml", modelAdr="runs/cv")``.
    """
    from thumbclf.config import DEPLOY

    return _run(DEPLOY, experiment, output, resume, quiet, settings)


def init_experiment(path: str | os.PathLike, *, workflow: str | None = None) -> Path:
    """Write a commented experiment file to start from (YAML); never overwrite a file.

    ``workflow``: 'train' or 'deploy' for only that workflow's keys; None for both.
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
    models), max_image_pixels, slide_thumbnail_size, cache_dir.
    """
    from thumbclf.config import DEPLOY, validate
    from thumbclf.core.decide import threshold_in_force
    from thumbclf.inputs.samples import SampleSet
    from thumbclf.nn.engine import pick_device
    from thumbclf.workflows.deploy import load_models, prepare_runners

    paths = _plain(path) if isinstance(path, (str, os.PathLike)) else [_plain(p) for p in path]
    raw = _override({"thumbData": "."}, {**settings, "modelAdr": paths})
    # thumbData and output are placeholders: predict() names the images and a temporary folder
    params = validate(raw, workflow=DEPLOY, source=Path("load_model()"), output=Path.cwd(),
                      base=Path.cwd())
    models = load_models(params)
    chosen = threshold_in_force(given=params.prediction_threshold,
                                stored=[m.threshold for m in models])
    device = pick_device(params.device)
    nothing = SampleSet((), (), False, Path.cwd())  # verified on verify_data or the model's own
    runners, _ = prepare_runners(models, dataclasses.replace(params, has_labels=False), nothing,
                                 device, chosen.value)
    return Classifier(params, models, chosen.value, chosen.reason, device, runners)


@dataclasses.dataclass
class Classifier:
    """Loaded model(s) plus the settings to feed them; ``predict`` gives a predictions table."""

    params: DeployParams
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
        """
        import pandas as pd
        from PIL import Image

        if isinstance(images, pd.DataFrame):
            return self._predict_samples(*self._frame_samples(images, has_labels))
        if isinstance(images, (str, os.PathLike)):
            path = Path(images).absolute()
            if path.is_dir() or _is_table(path):
                return self._predict_samples(*self._discover(path, has_labels))
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
        return self._predict_samples(SampleSet(samples, (), False, Path.cwd()), False)

    # -- inputs

    def _discover(self, path: Path, has_labels: bool | None):
        from thumbclf.inputs.samples import discover, has_column, read_table

        if has_labels is None:  # a table: when it has labels; a folder: a flat folder
            has_labels = (_is_table(path) and path.is_file()
                          and has_column(read_table(path), "CLASSIFICATION"))
        return discover(path, need_labels=has_labels), has_labels

    def _frame_samples(self, df, has_labels: bool | None):
        from thumbclf.inputs.samples import has_column, samples_from_frame

        df = df.copy()
        df.columns = [str(c).strip() for c in df.columns]
        df = df.fillna("").astype(str)
        if has_labels is None:
            has_labels = has_column(df, "CLASSIFICATION")
        return samples_from_frame(df, source=Path("<DataFrame>"), base=Path.cwd(),
                                  need_labels=has_labels), has_labels

    # -- predicting

    def _predict_samples(self, sample_set, has_labels: bool) -> pd.DataFrame:
        """Files through the command line's own streaming code, into a temporary folder."""
        from thumbclf.inputs import slides
        from thumbclf.workflows.deploy import final_table, predict_stream

        with tempfile.TemporaryDirectory(prefix="thumbclf-predict-") as tmp:
            folder = Path(tmp) / "predictions"
            folder.mkdir()
            params = dataclasses.replace(self.params, output=folder, has_labels=has_labels)
            partial, _ = predict_stream(self.models, sample_set, folder, params=params,
                                        threshold=self.threshold, device=self.device,
                                        quiet=True, resume=False,
                                        choose=lambda: (self.runners, ""))
            is_slide = [slides.is_slide(s.path) for s in sample_set.samples]
            return final_table(sample_set, partial, self.classes, has_labels, self.threshold,
                               is_slide)

    def _predict_pictures(self, items: list) -> pd.DataFrame:
        """In-memory pictures (and paths beside them), preprocessed as files are."""
        import numpy as np
        import torch
        from PIL import Image

        from thumbclf.core import table
        from thumbclf.core.decide import decide_with_reasons
        from thumbclf.core.errors import ImageReadError
        from thumbclf.inputs.decode import load_array
        from thumbclf.predict.ensemble import ensemble_predict

        prep = self.models[0].prep
        names, arrays, errors = [], [], []
        for item in items:
            if isinstance(item, Image.Image):
                names.append(str(getattr(item, "filename", "") or ""))
                arrays.append(picture_array(item, prep))
                errors.append("")
                continue
            path = Path(item).absolute()
            names.append(str(path))
            try:
                arrays.append(load_array(path, prep))
                errors.append("")
            except ImageReadError as exc:
                arrays.append(None)
                errors.append(str(exc))
        for m in self.models:
            m.model.to(self.device)
            if not m.legacy:
                m.model.to(memory_format=torch.channels_last)
        ok = [i for i, a in enumerate(arrays) if a is not None]
        probs = np.full((len(items), len(self.classes)), np.nan)
        unfamiliarity = np.full(len(items), np.nan)
        size = self.params.batch_size
        for start in range(0, len(ok), size):
            rows = ok[start:start + size]
            x = torch.from_numpy(np.stack([arrays[i] for i in rows]))
            p, u = ensemble_predict(self.models, self.runners, x, self.device, self.params.tta)
            probs[rows] = [[float(f"{v:.6g}") for v in r] for r in p]  # as predictions.csv
            if u is not None:
                unfamiliarity[rows] = [float(f"{v:.4g}") for v in u]
        decisions, reasons = [""] * len(items), [""] * len(items)
        if ok:
            for i, d, r in zip(ok, *decide_with_reasons(probs[ok], self.classes, self.threshold,
                                                        unfamiliarity[ok])):
                decisions[i], reasons[i] = d, r
        samples = [types.SimpleNamespace(path=n, row=None, label=None, patient=None) for n in names]
        has_rule = self.models[0].familiarity is not None
        return table.build(samples, probs, self.classes, decisions, threshold=self.threshold,
                           reasons=reasons, unfamiliarity=unfamiliarity if has_rule else None,
                           labels=False, patients=False, errors=errors)


def picture_array(img, prep) -> Any:
    """A PIL image -> the model's uint8 input array, as ``decode.load_array`` makes it from a file."""
    from PIL import ImageOps

    from thumbclf.inputs.images import (
        EXIF_ORIENTATION,
        fit_square,
        legacy_square,
        to_rgb,
    )

    if img.getexif().get(EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    return legacy_square(img, prep.size) if prep.recipe == "legacy" else fit_square(img, prep.size)


def _is_table(path: Path) -> bool:
    from thumbclf.inputs.samples import TABLE_SUFFIXES

    return path.suffix.lower() in TABLE_SUFFIXES


__all__ = ["train", "deploy", "load_model", "Classifier", "init_experiment",
           "load_experiment", "execute"]
