"""int8 quantisation of an OpenVINO model with NNCF, on unlabelled calibration batches.

NNCF speaks through thumbclf's logging while it quantises (its records reach run.log, and
the console as thumbclf's own do: warnings only with --quiet), not through its own handler on
stdout; its progress bars (drawn with rich's console) show only where thumbclf's own would:
not with --quiet, not when the output is not a terminal.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

from thumbclf.core.errors import ConfigError

INSTALL = 'pip install "thumbclf[openvino]"'


def quantise(ov_model, calibration: Callable | None, *, progress: bool = False):
    """``ov_model`` quantised to int8 (NNCF's mixed preset), calibrated on every batch that
    ``calibration()`` yields (normalised NCHW float tensors)."""
    try:
        import nncf
    except ImportError:
        raise ConfigError(f"precision int8 needs NNCF; {INSTALL}") from None
    batches = list(calibration()) if calibration is not None else []
    if not batches:
        raise ConfigError("precision: int8 needs readable deploy images to calibrate the "
                          "quantisation; use precision: auto, fp32 or bf16")
    with nncf_output(progress):
        # subset_size counts the dataset's items, here batches (not images): all of them
        return nncf.quantize(ov_model, nncf.Dataset(batches, lambda b: b.numpy()),
                             preset=nncf.QuantizationPreset.MIXED, subset_size=len(batches),
                             fast_bias_correction=False)


@contextlib.contextmanager
def nncf_output(progress: bool) -> Iterator[None]:
    """NNCF's log records through thumbclf's logging, and its progress bars only if
    ``progress``, while the block runs."""
    import rich

    nncf_log = logging.getLogger("nncf")
    handlers, propagate = list(nncf_log.handlers), nncf_log.propagate
    nncf_log.handlers[:] = []  # its own handler writes "INFO:nncf:..." to stdout, quiet or not
    nncf_log.propagate = True
    console = rich.get_console()  # NNCF's bars take rich's global console
    was_quiet = console.quiet
    console.quiet = was_quiet or not progress
    try:
        yield
    finally:
        console.quiet = was_quiet
        nncf_log.handlers[:], nncf_log.propagate = handlers, propagate
