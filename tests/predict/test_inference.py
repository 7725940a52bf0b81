"""Inference engines and the quality gate of reduced precision (issue: deploy faster on CPUs)."""

import numpy as np
import pytest
import torch

from conftest import small_net
from thumbclf.predict import inference
from thumbclf.core.errors import ConfigError

CPU = torch.device("cpu")


def test_reduced_precision_only_where_the_cpu_computes_it_natively(monkeypatch):
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(inference, "openvino_version", lambda: "2026.4")
    assert inference.candidates("auto", "auto", CPU) == [("torch", "fp32")]
    assert inference.candidates("openvino", "auto", CPU) == [("openvino", "fp32"), ("torch", "fp32")]
    with pytest.raises(ConfigError, match="not computed natively by this CPU"):
        inference.candidates("auto", "bf16", CPU)
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_vnni"}))
    assert inference.candidates("auto", "auto", CPU)[:2] == [("openvino", "bf16"), ("torch", "bf16")]
    assert inference.candidates("openvino", "int8", CPU) == [("openvino", "int8")]
    monkeypatch.setattr(inference, "openvino_version", lambda: None)
    assert inference.candidates("auto", "auto", CPU) == [("torch", "bf16"), ("torch", "fp32")]
    with pytest.raises(ConfigError, match=r'engine: openvino is not installed; pip install "thumbclf\[openvino\]"'):
        inference.candidates("openvino", "auto", CPU)
    with pytest.raises(ConfigError, match="needs engine: openvino"):
        inference.candidates("auto", "int8", CPU)


@pytest.fixture(scope="module")
def tiny_model():
    return small_net()


@pytest.mark.isolated
def test_openvino_fp32_computes_what_pytorch_computes(tiny_model, tmp_path):
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    x = torch.randn(4, 3, 64, 64)
    ov = inference.openvino_runner(tiny_model, 64, "fp32", tmp_path / "ov")
    ref = inference.torch_runner(tiny_model, CPU, "fp32", True)
    assert torch.allclose(ov(x), ref(x), atol=1e-4)
    assert (tmp_path / "ov" / "model.xml").is_file()  # converted once, cached
    again = inference.openvino_runner(tiny_model, 64, "fp32", tmp_path / "ov")
    assert torch.allclose(again(x), ov(x))


def _choose(model, tmp_path, precision, verify, engine="openvino"):
    file = tmp_path / "m.pt"
    if not file.exists():
        torch.save(model.state_dict(), file)
    return inference.choose(
        inference.ModelSpec(model, file, 64, ("A", "B", "C"), 0.5),
        inference.EngineSpec(engine, precision, tmp_path / "cache", CPU), verify)


def _evidence(x, labels, deploy, calls=None):
    """The gate's evidence of images ``x`` (``labels``: -1 for the deploy's own)."""
    def decode():
        if calls is not None:
            calls.append(1)
        return (lambda b: b), [x[i:i + 16] for i in range(0, len(x), 16)], labels, deploy
    return inference.Evidence(f"{len(x)}|{deploy}", len(x), decode)


@pytest.mark.isolated
def test_a_precision_is_used_only_after_it_passed_the_gate(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    x = torch.randn(160, 3, 64, 64)
    with torch.inference_mode():
        y = tiny_model(x[120:]).argmax(1).numpy()
    few = _evidence(x[:40], np.full(40, -1), 40)
    with pytest.raises(ConfigError, match="not verified: 40 images to check it on; even with no "
                                          "decision changed, at least 149"):
        _choose(tiny_model, tmp_path, "bf16", lambda: few)
    runner, why = _choose(tiny_model, tmp_path, "auto", lambda: None)
    assert runner.name == "openvino fp32" and "not verified: 0 images" in why  # engine: openvino
    calls = []
    ev = _evidence(x, np.r_[np.full(120, -1), y], 120, calls)
    monkeypatch.setitem(inference.GATE, "auroc", -1.0)  # a gate nothing can pass
    with pytest.raises(ConfigError, match="refused by the quality gate: with the band .*"
                                          r"decisions changed on \d+ of 160 images \(120 of this "
                                          "deploy's images and 40 labelled images;"):
        _choose(tiny_model, tmp_path, "bf16", lambda: ev)
    assert calls == [1]
    runner, why = _choose(tiny_model, tmp_path, "auto", lambda: _evidence(
        x, np.r_[np.full(120, -1), y], 120, calls))  # the verdict is cached: nothing decoded
    assert runner.name == "openvino fp32" and "refused by the quality gate" in why
    assert calls == [1]


def _deploy_with_gate(exp, gate: dict, monkeypatch):
    """A deploy through the command line, with the gate's limits set to ``gate`` (the test runs
    in the isolated tests' fresh process: issue 32, no interpreter of its own per deploy)."""
    from conftest import run_cli

    for key, value in gate.items():
        monkeypatch.setitem(inference.GATE, key, value)
    return run_cli("deploy", [str(exp), "--quiet"])


@pytest.mark.slow
@pytest.mark.isolated
def test_a_deploy_says_which_engine_computed_and_why(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    if not inference.native("bf16", CPU):
        pytest.skip("this CPU has no native bf16 (AVX-512 BF16 or AMX)")
    import json

    from conftest import train_once, write_yaml

    model = train_once(tmp_path, "m", f"thumbData: {tiny_data}\ntrainFull: true\npretrained: false\n"
                       "max_epochs: 1\nbootstrap: 0\ngradcam: 0\nnum_workers: 0\n")[0]
    text = (f"thumbData: {tiny_data}\nmodelAdr: {model}\nbootstrap: 0\ngradcam: 0\n"
            f"num_workers: 0\nverify_data: {tiny_data}\n")
    nothing_passes = {"max_changed": 0.0}
    exp = write_yaml(tmp_path / "refused.yaml", text + "engine: openvino\nprecision: bf16\n")
    r = _deploy_with_gate(exp, nothing_passes, monkeypatch)
    assert r.returncode == 2, r.stderr
    assert ("precision: bf16: openvino bf16 not verified: 18 images to check it on; even with no "
            "decision changed" in r.stderr)
    assert not (tmp_path / "refused" / "predictions.csv").exists()
    # auto on a deploy smaller than the verification sample: PyTorch fp32, which verifying
    # would compute anyway, and says so (issue 29: no candidate is even tried)
    exp = write_yaml(tmp_path / "auto.yaml", text)
    r = _deploy_with_gate(exp, nothing_passes, monkeypatch)
    assert r.returncode == 0, r.stderr
    note = json.loads((tmp_path / "auto" / "timings.json").read_text())["inference"]
    assert note.startswith("PyTorch fp32 (18 images: fewer than the 300") and "nothing extra" in note
    everything_passes = {"max_changed": 1.0, "auroc": 1.0, "accuracy_decided": 1.0}
    exp = write_yaml(tmp_path / "bf16.yaml", text + "engine: openvino\nprecision: bf16\n")
    r = _deploy_with_gate(exp, everything_passes, monkeypatch)
    assert r.returncode == 0, r.stderr
    note = json.loads((tmp_path / "bf16" / "timings.json").read_text())["inference"]
    assert note.startswith("openvino bf16 (verified: with the band (probability ±")
    assert "of 18 images (18 labelled images;" in note
    assert "recomputed in fp32 (band: probability ±" in note  # issue 29: the share recomputed
    assert "Inference: openvino bf16" in (tmp_path / "bf16" / "report.html").read_text()


def test_auto_says_why_it_computes_in_fp32_on_a_cpu_without_native_bf16(monkeypatch, tiny_model,
                                                                          tmp_path):
    """The log, timings.json and the report are to say which engine computed and why; on a
    CPU without AVX-512 BF16 or AMX a default deploy said only "PyTorch fp32"."""
    model = inference.ModelSpec(tiny_model, tmp_path / "m.pt", 64, ("a", "b", "c"), 0.9)
    monkeypatch.setattr(inference, "openvino_version", lambda: None)
    monkeypatch.setattr(inference, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    _, why = inference.choose(model, inference.EngineSpec(cache_dir=tmp_path), None)
    assert why == ("PyTorch fp32 (this CPU computes no bf16 natively, so no faster precision "
                   "is tried)")
    _, why = inference.choose(model, inference.EngineSpec(precision="fp32", cache_dir=tmp_path),
                              None)
    assert why == "PyTorch fp32"  # asked for: nothing to explain
