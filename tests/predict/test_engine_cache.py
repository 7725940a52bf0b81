"""The engine cache: an entry is trusted only for the model and key it was made for (issue 33)."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import small_net

CPU = torch.device("cpu")


def _choose(model, file, cache):
    from thumbclf.predict import inference

    if not file.exists():
        torch.save(model.state_dict(), file)
    return inference.choose(
        inference.ModelSpec(model, file, 64, ("A", "B", "C"), 0.5),
        inference.EngineSpec("openvino", "fp32", cache, CPU), lambda: None)


def _entries(cache):
    engines = sorted(p for p in (cache / "engines").iterdir() if p.name != "verdicts")
    verdicts = sorted((cache / "engines" / "verdicts").glob("*.json"))
    return engines, verdicts


@pytest.mark.isolated
def test_a_copied_or_linked_entry_of_another_model_is_not_trusted(tmp_path, caplog):
    """Issue 33, item 8: copying model B's engine folder and verdict over model A's (two cp,
    no hash recomputed) made A compute with B, logged as verified; an entry that is a link was
    kept (rmtree(ignore_errors=True) does not delete a link) and run without any check."""
    pytest.importorskip("openvino", reason="OpenVINO is the optional extra thumbclf[openvino]")
    a, b = small_net(0), small_net(1)
    x = torch.randn(4, 3, 64, 64)
    cache_a, cache_b = tmp_path / "cache_a", tmp_path / "cache_b"
    runner, _ = _choose(a, tmp_path / "a.pt", cache_a)
    expected = runner(x)
    _choose(b, tmp_path / "b.pt", cache_b)
    (eng_a,), (ver_a,) = _entries(cache_a)
    (eng_b,), (ver_b,) = _entries(cache_b)
    shutil.rmtree(eng_a)
    shutil.copytree(eng_b, eng_a)  # B's engine and verdict under A's names
    shutil.copy(ver_b, ver_a)
    caplog.set_level("WARNING")
    runner, _ = _choose(a, tmp_path / "a.pt", cache_a)
    assert "another model or cache entry" in caplog.text
    assert torch.allclose(runner(x), expected, atol=1e-4)
    caplog.clear()
    good_verdict = ver_a.read_bytes()
    shutil.rmtree(eng_a)
    eng_a.symlink_to(eng_b, target_is_directory=True)  # a link to B's engine, A's own verdict
    runner, _ = _choose(a, tmp_path / "a.pt", cache_a)
    assert "not the one verified" in caplog.text
    assert torch.allclose(runner(x), expected, atol=1e-4)
    assert not eng_a.is_symlink() and eng_b.is_dir()  # the link went, never what it points to
    assert ver_a.read_bytes() != b"" and good_verdict
