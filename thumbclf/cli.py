"""Command lines of both scripts; the only place that knows exit codes.

The project's own errors reach the user as one line each on stderr (``--debug`` shows the
traceback); Ctrl-C and SIGTERM stop a run cleanly and say how to resume it.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
from pathlib import Path

from .config import DEPLOY, TRAIN, load_params
from .errors import ThumbclfError, clean
from .results import prepare_output, setup_logging

log = logging.getLogger(__name__)
EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
# operating-system errors the user can fix: full disk, quota, read-only or forbidden folder
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

DESCRIPTIONS = {
    TRAIN: "Train a slide-thumbnail classifier (cross-validation or full training) as an "
           "experiment file says.",
    DEPLOY: "Classify thumbnails or slides with a trained model as an experiment file says.",
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

    setup_logging(None, quiet=args.quiet, debug=args.debug)
    folder = lock = None
    try:
        params = load_params(experiment, workflow=workflow, overrides=args.overrides,
                             output=args.output)
        if workflow == TRAIN:
            from .train import preflight, run
        else:
            # decoding workers share the cores with the model: idle OpenMP threads should sleep,
            # not spin (measured +10% on PNG thumbnails on 2 cores); read when torch loads
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            from .deploy import preflight, run
        preflight(params)  # everything that can be checked before the first file is written
        folder = params.output
        lock = prepare_output(folder, resume=args.resume)
        setup_logging(folder, quiet=args.quiet, debug=args.debug)
        log.info("thumbclf %s: %s -> %s", workflow, params.source, folder)
        run(params, resume=args.resume, quiet=args.quiet or not sys.stderr.isatty())
        return 0
    except ThumbclfError as exc:
        log.debug("stopped with an error: %s", exc, exc_info=True)  # run.log; console if --debug
        for line in exc.lines():
            print(f"error: {line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.debug("interrupted (Ctrl-C or SIGTERM)")
        where = f" in {folder}" if folder else ""
        print(f"\ninterrupted: finished work is kept{where}; continue with the same command "
              "plus --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            return _bug(exc, folder)
        log.debug("stopped with an error", exc_info=True)
        where = exc.filename or folder or experiment
        print(f"error: {clean(where)}: {exc.strerror}; free space or fix the permissions, then "
              "run the same command plus --resume", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback in run.log
        return _bug(exc, folder)
    finally:
        if lock is not None:
            lock.release()


def _bug(exc: BaseException, folder: Path | None) -> int:
    log.debug("unexpected error", exc_info=True)  # run.log; console if --debug
    where = "the traceback is in run.log; " if folder is not None else ""
    print(f"error: unexpected {type(exc).__name__}: {clean(str(exc))[:300]} (a bug in thumbclf? "
          f"{where}--debug shows it)", file=sys.stderr)
    return EXIT_BUG


def train_main() -> None:
    sys.exit(main(TRAIN))


def deploy_main() -> None:
    sys.exit(main(DEPLOY))
