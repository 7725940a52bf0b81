"""core/logs.py: what reaches the console and what only run.log."""

from __future__ import annotations

import logging

from thumbclf.core.logs import remove_handlers, setup_logging


def test_library_messages_go_to_run_log_not_the_console(tmp_path, capsys):
    """Issues 31 (item 6) and 33 (item 2): tifffile's "TiffPage ..." lines and other
    libraries' messages were printed on the console beside thumbclf's own one-line error."""
    setup_logging(tmp_path)
    try:
        logging.getLogger("tifffile").warning("TiffPage 1: TypeError: ... not found")
        logging.getLogger().warning("wsidicomizer: could not determine pixel spacing")
        logging.getLogger("thumbclf.inputs.slides").warning("ours: shown")
    finally:
        remove_handlers()
    err = capsys.readouterr().err
    assert "ours: shown" in err and "TiffPage" not in err and "pixel spacing" not in err
    log = (tmp_path / "run.log").read_text()
    assert "TiffPage 1" in log and "pixel spacing" in log and "ours: shown" in log


def test_quiet_keeps_library_warnings_off_the_console(tmp_path, capsys):
    """Issue 24, hostile inputs."""
    import logging
    import warnings

    from thumbclf.core.logs import remove_handlers, setup_logging

    setup_logging(tmp_path, quiet=True)
    try:
        warnings.warn("No artists with labels found to put in legend", UserWarning)
        logging.getLogger("thumbclf.test").warning("a warning of thumbclf's own")
    finally:
        remove_handlers()
    err = capsys.readouterr().err
    assert "a warning of thumbclf's own" in err and "No artists" not in err
    assert "No artists with labels" in (tmp_path / "run.log").read_text()
