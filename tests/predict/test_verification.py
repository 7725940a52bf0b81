"""predict/verification.py and the engine cache: an engine is used only as it was verified
(issue 24: trusted caches)."""

import numpy as np
import pytest
import torch

from conftest import small_net

CPU = torch.device("cpu")


def _choose(model, tmp_path, precision, verify):
    from thumbclf.predict import inference

    file = tmp_path / "m.pt"
    if not file.exists():
        torch.save(model.state_dict(), file)
    return inference.choose(
        inference.ModelSpec(model, file, 64, ("A", "B", "C"), 0.5),
        inference.EngineSpec("openvino", precision, tmp_path / "cache", CPU), verify)


def _evidence(x, labels, calls=None):
    """The gate's evidence (predict.inference.Evidence) of labelled images ``x``, counting how
    often they are decoded in ``calls``."""
    from thumbclf.predict import inference

    def decode():
        if calls is not None:
            calls.append(1)
        return (lambda b: b), [x[i:i + 16] for i in range(0, len(x), 16)], labels, 0
    return inference.Evidence(f"{len(x)}|labelled", len(x), decode)


def _engine_file(tmp_path, name="model.bin"):
    found = [p for p in (tmp_path / "cache" / "engines").glob(f"*/{name}")]
    assert len(found) == 1, found
    return found[0]


@pytest.fixture()
def tiny_net():
    return small_net()


@pytest.mark.isolated
def test_a_changed_or_truncated_engine_is_rebuilt_and_verified_again(tiny_net, tmp_path,
                                                                     monkeypatch, caplog):
    """Issue 24, item 1: the engine cache is bound to what was verified."""
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    from thumbclf.predict import inference

    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    x = torch.randn(160, 3, 64, 64)  # enough for the gate's bound (149 at the least)
    with torch.inference_mode():
        y = tiny_net(x).argmax(1).numpy()
    verified = []

    def verify():
        return _evidence(x, y, verified)

    runner, _ = _choose(tiny_net, tmp_path, "bf16", verify)
    expected = runner(x[:4])
    bin_file = _engine_file(tmp_path)
    good = bin_file.read_bytes()
    data = bytearray(good)  # a valid IR whose weights are altered: the last 3 x 512 floats
    tail = np.frombuffer(bytes(data[-6144:]), dtype=np.float32).reshape(3, 512)
    data[-6144:] = np.roll(tail, 1, axis=0).tobytes()
    bin_file.write_bytes(bytes(data))
    caplog.set_level("WARNING")
    runner, why = _choose(tiny_net, tmp_path, "bf16", verify)
    assert "(model.bin changed since it was verified); converting and verifying it again" in caplog.text
    assert len(verified) == 2 and "verified earlier" not in why
    assert torch.allclose(runner(x[:4]), expected, atol=1e-2)
    assert _engine_file(tmp_path).read_bytes() == good
    caplog.clear()
    _engine_file(tmp_path).write_bytes(good[: len(good) // 2])  # truncated
    runner, _ = _choose(tiny_net, tmp_path, "bf16", verify)
    assert "not the one verified" in caplog.text and len(verified) == 3
    assert torch.allclose(runner(x[:4]), expected, atol=1e-2)


@pytest.mark.isolated
def test_a_verdict_flipped_to_passed_is_not_trusted(tiny_net, tmp_path, monkeypatch, caplog):
    """Issue 24, item 1: the engine cache is bound to what was verified."""
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    import json

    from thumbclf.predict import inference
    from thumbclf.core.errors import ConfigError

    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    monkeypatch.setitem(inference.GATE, "auroc", -1.0)  # a gate nothing can pass
    x = torch.randn(160, 3, 64, 64)
    y = np.arange(160) % 3
    with pytest.raises(ConfigError, match="refused by the quality gate"):
        _choose(tiny_net, tmp_path, "bf16", lambda: _evidence(x, y))
    verdict_file = next((tmp_path / "cache" / "engines" / "verdicts").glob("*.json"))
    verdict = json.loads(verdict_file.read_text())
    verdict["passed"] = True
    verdict_file.write_text(json.dumps(verdict))
    caplog.set_level("WARNING")
    with pytest.raises(ConfigError, match="refused by the quality gate"):
        _choose(tiny_net, tmp_path, "bf16", lambda: _evidence(x, y))
    assert "its verdict is unreadable or was altered" in caplog.text


@pytest.mark.isolated
def test_a_changed_exact_engine_is_converted_again(tiny_net, tmp_path, caplog):
    """Issue 24, item 1: the engine cache is bound to what was verified."""
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    x = torch.randn(4, 3, 64, 64)
    runner, _ = _choose(tiny_net, tmp_path, "fp32", lambda: None)
    expected = runner(x)
    bin_file = _engine_file(tmp_path)
    data = bytearray(bin_file.read_bytes())
    data[-6144:] = bytes(reversed(data[-6144:]))
    bin_file.write_bytes(bytes(data))
    caplog.set_level("WARNING")
    runner, _ = _choose(tiny_net, tmp_path, "fp32", lambda: None)
    assert "model.bin changed since it was verified" in caplog.text
    assert torch.allclose(runner(x), expected, atol=1e-5)
