"""Command lines: ``thumbclf train|deploy|evaluate|init`` and the two prototype scripts; the only
place that knows exit codes.

The project's own errors reach the user as one line each on stderr (``--debug`` shows the
traceback); Ctrl-C and SIGTERM stop a run cleanly and say how to resume it. The work itself is
done by the functions of the Python API (api.py), which raise those errors.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

from thumbclf.config import DEPLOY, PRETRAIN, TRAIN, load_params
from thumbclf.core.errors import ThumbclfError, clean
from thumbclf.core.version import __version__
from thumbclf.core.logs import setup_logging

log = logging.getLogger(__name__)
EXIT_ERROR, EXIT_BUG, EXIT_INTERRUPTED = 2, 1, 130
# operating-system errors the user can fix: full disk, quota, read-only or forbidden folder
USER_OS_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
RANK_GRACE_S = 20  # how long another torchrun rank leaves rank 0 to report a shared error

DESCRIPTIONS = {
    TRAIN: "Train a slide-thumbnail classifier (cross-validation or full training) as an "
           "experiment file says.",
    DEPLOY: "Classify thumbnails or slides with a trained model as an experiment file says.",
    PRETRAIN: "Pretrain a backbone self-supervised on unlabelled thumbnails or slides as an "
              "experiment file says; train from it with SSL: true.",
}


REVIEW_HELP = ("Write review/index.html into a results folder: a page (no network needed, works "
               "as a file) to work through the Undecided slides and the disagreements with the "
               "keyboard and export corrections.csv; train the next model with corrections: "
               "corrections.csv, or apply them to this deploy with --apply corrections.csv.")

EPILOG = ("Experiment-file keys: 'thumbclf init --train FILE' (or --deploy, --pretrain) writes "
          "a file with every key, its default and meaning; the documentation's Experiment-file "
          "keys reference says the same")


def parser(workflow: str) -> argparse.ArgumentParser:
    script = f"{workflow}_thumbclassifier.py"
    ap = argparse.ArgumentParser(prog=script, description=DESCRIPTIONS[workflow], epilog=EPILOG)
    ap = add_run_options(ap, prototype=True)
    return add_shard_option(ap) if workflow == DEPLOY else ap


SHARD_HELP = ("deploy the I-th of N shares of the inputs into OUTPUT/shards/I-of-N/ (a SLURM "
              "array task takes its share from SLURM_ARRAY_TASK_ID without it); a finished "
              "shard is skipped, an interrupted one continued; then: thumbclf merge OUTPUT")
MERGE_HELP = ("Join the finished shards of a deploy (RESULTS/shards/I-of-N/) into RESULTS: the "
              "predictions table, evaluation, report and sorted folders a single deploy writes.")


def add_shard_option(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """deploy's --shard I/N (issue 30)."""
    ap.add_argument("--shard", metavar="I/N", help=SHARD_HELP)
    return ap


def add_run_options(ap: argparse.ArgumentParser, prototype: bool = False
                    ) -> argparse.ArgumentParser:
    """The options of train and deploy (the scripts and the subcommands alike); the prototype's
    scripts also take the experiment file as --ExpFile, so there EXPERIMENT may be left out."""
    ap.add_argument("experiment", nargs="?" if prototype else None, type=Path,
                    metavar="EXPERIMENT",
                    help="experiment file (.yaml, .yml, .json, or .txt with JSON)")
    if prototype:
        ap.add_argument("--ExpFile", dest="expfile", type=Path,
                        help="the same, as the prototype took it")
    else:
        ap.set_defaults(expfile=None)
    ap.add_argument("--output", type=Path, help="results folder (default: next to the "
                    "experiment file, named after it)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override an experiment key, e.g. --set max_epochs=5 (repeatable)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in its "
                    "results folder (finished folds / predicted images are kept)")
    ap.add_argument("--quiet", action="store_true", help="warnings and errors only, no progress bars")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")
    return ap


def command_parser() -> argparse.ArgumentParser:
    """``thumbclf``: one command with a subcommand per task, as git or pip have."""
    ap = argparse.ArgumentParser(
        prog="thumbclf", description="Classify whole-slide-image thumbnails by slide type.",
        epilog="Run 'thumbclf COMMAND --help' for a command's options. Start with: thumbclf "
               "init --train my_experiment.yaml")
    ap.add_argument("--version", action="version", version=f"thumbclf {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for workflow in (TRAIN, DEPLOY, PRETRAIN):
        sp = sub.add_parser(workflow, help=DESCRIPTIONS[workflow], description=DESCRIPTIONS[workflow],
                            epilog=EPILOG)
        add_run_options(sp).set_defaults(subparser=sp)
        if workflow == DEPLOY:
            add_shard_option(sp)
    sp = sub.add_parser("merge", help=MERGE_HELP, description=MERGE_HELP)
    sp.add_argument("results", type=Path, help="the --output of the sharded deploy")
    sp.add_argument("--quiet", action="store_true", help="warnings and errors only")
    sp.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")
    sub.add_parser("evaluate", add_help=False, help="Recompute metrics, plots and the report from "
                   "a predictions.csv (options: thumbclf evaluate --help).")
    sp = sub.add_parser("review", help="Write a review page for a results folder; serve it, or "
                        "apply the corrections exported from it.", description=REVIEW_HELP)
    sp.add_argument("results", type=Path, help="a deploy or training results folder")
    sp.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 (this "
                    "machine only) and save each correction in review/journal.jsonl there")
    sp.add_argument("--port", type=int, default=8765, help="port for --serve (default 8765; "
                    "0: any free port)")
    sp.add_argument("--apply", type=Path, action="append", metavar="CORRECTIONS",
                    help="write reviewed_predictions.csv and copies in sorted/<reviewed class>/ "
                    "from this corrections table (repeatable) instead of writing the page")
    sp.add_argument("--quiet", action="store_true", help="warnings and errors only")
    sp.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")
    sp = sub.add_parser("init", help="Write a commented experiment file to start from.",
                        description="Write a commented experiment file (YAML) to start from: the "
                        "required keys set to examples, every other key commented out with its "
                        "default and meaning. Never overwrites a file.")
    which = sp.add_mutually_exclusive_group()
    which.add_argument("--train", dest="workflow", action="store_const", const=TRAIN,
                       help="only the keys of training")
    which.add_argument("--deploy", dest="workflow", action="store_const", const=DEPLOY,
                       help="only the keys of deployment")
    which.add_argument("--pretrain", dest="workflow", action="store_const", const=PRETRAIN,
                       help="only the keys of self-supervised pretraining")
    sp.add_argument("file", type=Path, help="the experiment file to write (.yaml or .yml)")
    return ap


COMMANDS = (TRAIN, DEPLOY, PRETRAIN, "evaluate", "review", "merge", "init")


STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # SIGINT is Python's KeyboardInterrupt already


def _sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


def main(workflow: str, argv: list[str] | None = None) -> int:
    """The prototype scripts: parse argv, run the workflow, turn every outcome into an exit code."""
    ap = parser(workflow)
    return run_workflow(workflow, ap.parse_args(argv), ap)


def run_workflow(workflow: str, args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    """Run train or deploy as parsed; every outcome becomes an exit code."""
    experiment = args.experiment or args.expfile
    if experiment is None or (args.experiment and args.expfile):
        ap.error("give one experiment file (EXPERIMENT or --ExpFile EXPERIMENT)")
    for name in STOP_SIGNALS:  # each one ends like Ctrl-C: 130, finished work kept, --resume
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _sigterm)
    from thumbclf.workflows.execute import execute

    setup_logging(None, quiet=args.quiet, debug=args.debug)
    folder = None

    def work() -> None:
        nonlocal folder
        params = load_params(experiment, workflow=workflow, overrides=args.overrides,
                             output=args.output)
        folder = params.output
        shard = None
        if workflow == DEPLOY:  # --shard I/N, or a SLURM array task's share
            from thumbclf.workflows.shards import folder_of, resolve

            shard = resolve(getattr(args, "shard", None))
            folder = folder_of(params.output, shard)
        execute(params, resume=args.resume, quiet=args.quiet, debug=args.debug,
                progress=not (args.quiet or not sys.stderr.isatty()), shard=shard)

    return guarded(work, lambda: folder)


def guarded(work, folder=lambda: None, again: str = "the same command plus --resume") -> int:
    """Run ``work()``; the project's errors, interruptions and bugs become exit codes.
    ``again`` is how to finish interrupted work."""
    for stream in (sys.stdout, sys.stderr):  # a console that cannot encode a name shows it
        if hasattr(stream, "reconfigure"):   # escaped, never crashes a print (issue 33)
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    try:
        work()
        return 0
    except ThumbclfError as exc:
        log.debug("stopped with an error: %s", exc, exc_info=True)  # run.log; console if --debug
        if _speaks():
            from thumbclf.nn import distributed

            rank = "" if distributed.is_main() else f"(rank {distributed.rank()}) "
            for line in exc.lines():
                print(f"error: {rank}{line}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.debug("interrupted (Ctrl-C or SIGTERM)")
        where = f" in {folder()}" if folder() else ""
        if _speaks(wait=False):
            print(f"\ninterrupted: finished work is kept{where}; continue with {again}",
                  file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno not in USER_OS_ERRORS:
            return _bug(exc, folder())
        log.debug("stopped with an error", exc_info=True)
        where = exc.filename or folder() or "thumbclf"
        print(f"error: {clean(where)}: {exc.strerror}; free space or fix the permissions, then "
              "run the same command plus --resume", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - last resort: one line, traceback in run.log
        return _bug(exc, folder())


def _speaks(wait: bool = True) -> bool:
    """Under torchrun only rank 0 prints: every rank meets the same errors. Another rank that
    stops with an error first waits (``wait``) for torchrun, which stops it once rank 0 has
    exited; had it exited at once, torchrun would stop rank 0 before it said why. A rank still
    running after the wait met an error of its own, and says it."""
    from thumbclf.nn import distributed

    if distributed.is_main():
        return True
    if not wait:
        return False
    try:
        time.sleep(RANK_GRACE_S)
    except KeyboardInterrupt:  # torchrun's SIGTERM: rank 0 has said it
        return False
    return True


def _bug(exc: BaseException, folder: Path | None) -> int:
    log.debug("unexpected error", exc_info=True)  # run.log; console if --debug
    where = "the traceback is in run.log; " if folder is not None else ""
    print(f"error: unexpected {type(exc).__name__}: {clean(str(exc))[:300]} (a bug in thumbclf? "
          f"{where}--debug shows it)", file=sys.stderr)
    return EXIT_BUG


def init_file(path: Path, workflow: str | None) -> None:
    """``thumbclf init``: write the starting file and say what to do next."""
    from thumbclf.api import init_experiment

    init_experiment(path, workflow=workflow)
    keys = ("thumbData and modelAdr (and hasLabels: true for labelled slides)"
            if workflow == DEPLOY else "thumbData")
    print(f"wrote {path}: set {keys}, then run: thumbclf {workflow or TRAIN} {path}")


def evaluate_main(argv: list[str] | None = None, prog: str = "thumbclf evaluate") -> int:
    """``thumbclf evaluate PREDICTIONS.csv``: recompute metrics, plots and the report."""
    ap = argparse.ArgumentParser(prog=prog, description="Recompute metrics, plots and report "
                                 "from a predictions table.")
    ap.add_argument("predictions", type=Path, help="a predictions.csv written by thumbclf")
    ap.add_argument("--threshold", type=float, help="decide again with this threshold (0-1)")
    ap.add_argument("--output", type=Path, help="folder for the results (default: "
                    "<table's folder>/evaluation[-T])")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quiet", action="store_true", help="warnings and errors only")
    ap.add_argument("--debug", action="store_true", help="show tracebacks and debug messages")
    args = ap.parse_args(argv)
    setup_logging(None, quiet=args.quiet, debug=args.debug)

    def work() -> None:
        from thumbclf.core.privacy import keep_caches_in

        keep_caches_in(None)  # no cache folder: matplotlib's goes in a temporary one
        from thumbclf.workflows.evaluate import evaluate_file

        out = evaluate_file(args.predictions, threshold=args.threshold, output=args.output,
                            bootstrap=args.bootstrap, seed=args.seed, quiet=args.quiet,
                            debug=args.debug)
        print(f"results in {out}")

    return guarded(work)


def review_command(args: argparse.Namespace) -> int:
    """``thumbclf review RESULTS [--serve | --apply CORRECTIONS]``."""
    setup_logging(None, quiet=args.quiet, debug=args.debug)
    signal.signal(signal.SIGTERM, _sigterm)

    def work() -> None:
        from thumbclf.workflows import review as review_flow

        if args.apply:
            print(f"reviewed table: {review_flow.apply(args.results, args.apply)}")
        elif args.serve:
            review_flow.serve(args.results, args.port, progress=not args.quiet)
        else:
            page = review_flow.write_review(args.results, progress=not args.quiet and sys.stderr.isatty())
            if args.quiet:  # else the run's own line has named it
                print(f"review page: {page}")
            print("open it in a browser, or serve it with: "
                  + shlex.join(["thumbclf", "review", str(args.results), "--serve"]))

    if args.serve and args.apply:
        print("error: give --serve or --apply, not both", file=sys.stderr)
        return EXIT_ERROR
    return guarded(work, lambda: args.results, again="the same command")


def merge_command(args: argparse.Namespace) -> int:
    """``thumbclf merge RESULTS``: the shards of a deploy joined into RESULTS."""
    setup_logging(None, quiet=args.quiet, debug=args.debug)
    signal.signal(signal.SIGTERM, _sigterm)

    def work() -> None:
        from thumbclf.workflows.merge import merge

        print(f"merged results in {merge(args.results, quiet=args.quiet)}")

    return guarded(work, lambda: args.results, again="the same command")


def command(argv: list[str] | None = None) -> int:
    """``thumbclf COMMAND ...``: dispatch to a subcommand; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "evaluate":  # evaluate parses its own options (and --help)
        return evaluate_main(argv[1:], prog="thumbclf evaluate")
    ap = command_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in COMMANDS:
        close = difflib.get_close_matches(argv[0], COMMANDS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        ap.print_usage(sys.stderr)
        print(f"thumbclf: error: {argv[0]!r} is not a command; {hint}(commands: "
              f"{', '.join(COMMANDS)})", file=sys.stderr)
        return EXIT_ERROR
    args = ap.parse_args(argv)
    if args.command == "init":
        return guarded(lambda: init_file(args.file, args.workflow))
    if args.command == "review":
        return review_command(args)
    if args.command == "merge":
        return merge_command(args)
    return run_workflow(args.command, args, args.subparser)


def command_main() -> None:
    """Entry point of the ``thumbclf`` console script and ``python -m thumbclf``."""
    sys.exit(command())


def train_main() -> None:
    sys.exit(main(TRAIN))


def deploy_main() -> None:
    sys.exit(main(DEPLOY))


def pretrain_main() -> None:
    sys.exit(main(PRETRAIN))
