"""predict/quantise.py: int8 quantisation with NNCF, whose output goes through thumbclf's logging."""

import pytest


def test_nncf_speaks_through_thumbclf_logging(tmp_path, capfd):
    """Issue 24, hostile inputs."""
    pytest.importorskip("nncf", reason="int8 needs the optional extra thumbclf[openvino]")
    import logging

    from thumbclf.core.logs import remove_handlers, setup_logging
    from thumbclf.predict.quantise import nncf_output

    setup_logging(tmp_path, quiet=True)
    nncf_log = logging.getLogger("nncf")
    try:
        with nncf_output(progress=False):
            nncf_log.info("an INFO of NNCF's")
            nncf_log.warning("a WARNING of NNCF's")
    finally:
        remove_handlers()
    out, err = capfd.readouterr()
    assert out == "" and "an INFO" not in err and "a WARNING of NNCF's" in err
    log = (tmp_path / "run.log").read_text()
    assert "an INFO of NNCF's" in log and "a WARNING of NNCF's" in log
