"""``python -m thumbclf.evaluate``: the same as ``thumbclf evaluate``."""

import sys

from thumbclf.cli import evaluate_main


def main(argv: list[str] | None = None) -> int:
    """Recompute metrics, plots and the report from a predictions table."""
    return evaluate_main(argv, prog="python -m thumbclf.evaluate")


if __name__ == "__main__":
    sys.exit(main())
