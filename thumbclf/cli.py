"""Command lines of the scripts; the only place that knows exit codes.

The project's own errors reach the user as one line each on stderr (``--debug`` shows the
traceback); Ctrl-C and SIGTERM stop a run cleanly and say how to resume it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .config import DEPLOY, PRETRAIN, TRAIN, load_params
from .errors import ThumbclfError

log = logging.getLogger(__name__)
EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130

DESCRIPTIONS = {
    TRAIN: "Train a slide-thumbnail classifier (cross-validation or full training) as an "
           "experiment file says.",
    DEPLOY: "Classify thumbnails or slides with a trained model as an experiment file says.",
    PRETRAIN: "Pretrain a backbone self-supervised on unlabelled thumbnails or slides as an "
              "experiment file says; train from it with SSL: true.",
}


def parser(workflow: str) -> argparse.ArgumentParser:
    script = f"{workflow}_thumbclassifier.py"
    ap = argparse.ArgumentParser(
        prog=script, description=DESCRIPTIONS[workflow],
        epilog="Experiment-file keys: see experiments/template.yaml and the README.")
    ap.add_argument("experiment", nargs="?", type=Path,
                    help="experiment file (.yaml, .yml, .json, or .txt with JSON)")
    ap.add_argument("--ExpFile", dest="expfile", type=Path, help="the same, as the prototype took it")
    ap.add_argument("--output", type=Path, help="results folder (default: next to the "
                    "experiment file, named after it)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an experiment key, e.g. --set max_epochs=5 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in its "
                    "results folder (finished folds / predicted images are kept)")
    ap.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bars")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")
    return ap


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(workflow: str, argv: list[str] | None = None) -> int:
    """Parse argv, run the workflow, and turn every outcome into an exit code."""
    args = parser(workflow).parse_args(argv)
    experiment = args.experiment or args.expfile
    if experiment is None or (args.experiment and args.expfile):
        parser(workflow).error("give one experiment file (EXPERIMENT or --ExpFile EXPERIMENT)")
    signal.signal(signal.SIGTERM, _sigterm)
    from .results import prepare_output, setup_logging

    setup_logging(None, quiet=args.quiet, debug=args.debug)
    folder = None
    try:
        params = load_params(experiment, workflow=workflow, overrides=args.overrides,
                             output=args.output)
        folder = params.output
        prepare_output(folder, resume=args.resume)
        setup_logging(folder, quiet=args.quiet, debug=args.debug)
        log.info("thumbclf %s: %s -> %s", workflow, params.source, folder)
        if workflow == TRAIN:
            from .train import run
        elif workflow == PRETRAIN:
            from .pretrain import run
        else:
            # decoding workers share the cores with the model: idle OpenMP threads should sleep,
            # not spin (measured +10% on PNG thumbnails on 2 cores); read when torch loads
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            from .deploy import run
        run(params, resume=args.resume, quiet=args.quiet or not sys.stderr.isatty())
        return 0
    except ThumbclfError as exc:
        log.debug("stopped with an error: %s", exc, exc_info=True)  # run.log; console if --debug
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.debug("interrupted (Ctrl-C or SIGTERM)")
        where = f" in {folder}" if folder else ""
        print(f"\ninterrupted: finished work is kept{where}; continue with the same command "
              "plus --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback in run.log
        log.debug("unexpected error", exc_info=True)  # run.log; console if --debug
        print(f"error: unexpected {type(exc).__name__}: {exc} (a bug in thumbclf? the "
              "traceback is in run.log; --debug shows it)", file=sys.stderr)
        return EXIT_BUG


def train_main() -> None:
    sys.exit(main(TRAIN))


def deploy_main() -> None:
    sys.exit(main(DEPLOY))


def pretrain_main() -> None:
    sys.exit(main(PRETRAIN))
