"""predict/engines.py and predict/stream.py: verification inside the deploy stream (issue 29).

The verification images are the first images of the deploy's own stream, computed both ways
from the same decoded batch: nothing is decoded twice; a deploy smaller than the verification
sample computes PyTorch fp32 at no extra cost; with the band, a reduced precision decides every
image as a ``precision: fp32`` deploy does."""

from __future__ import annotations

import json
import os
from collections import Counter

import pandas as pd
import pytest

from conftest import run_cli, write_yaml
from thumbclf.core import layout
from thumbclf.predict import engines, gate, inference

KEYS = "bootstrap: 0\ngradcam: 0\nnum_workers: 0\nsortThumbs: false\nhasLabels: false\n"


def _links(tiny_data, folder, n):
    """``n`` distinct paths to the tiny data's images (hard links)."""
    files = sorted(p for p in tiny_data.parent.rglob("*.jpg"))
    folder.mkdir()
    for i in range(n):
        os.link(files[i % len(files)], folder / f"{i:04d}.jpg")
    return folder


def _deploy(tmp_path, name, data, model, extra=""):
    exp = write_yaml(tmp_path / f"{name}.yaml", f"thumbData: {data}\nmodelAdr: {model}\n{KEYS}"
                     f"cache_dir: {tmp_path / 'cache'}\n{extra}")
    r = run_cli("deploy", [str(exp), "--quiet"])
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / name / "predictions.csv")
    note = json.loads((tmp_path / name / "timings.json").read_text())["inference"]
    return table, note


@pytest.fixture()
def decoded(monkeypatch):
    """Every path the deploy decodes, counted."""
    from thumbclf.nn import data

    seen: Counter = Counter()
    real = data.load_array

    def counting(path, *args, **kwargs):
        seen[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(data, "load_array", counting)
    return seen


@pytest.mark.slow
def test_a_small_deploy_computes_fp32_and_decodes_each_image_once(tiny_model, tiny_data,
                                                                  tmp_path, decoded):
    data = _links(tiny_data, tmp_path / "images-small", 40)
    table, note = _deploy(tmp_path, "small", data, layout.model_files_in(tiny_model)[0])
    assert note.startswith("PyTorch fp32 (40 images: fewer than the 300")
    assert "costs nothing extra" in note
    assert set(decoded.values()) == {1} and len(decoded) == 40  # no separate gate sample


@pytest.mark.slow
def test_the_stream_verifies_on_its_first_images_and_decides_as_fp32(tiny_model, tiny_data,
                                                                     tmp_path, decoded,
                                                                     monkeypatch):
    if not inference.native("bf16", inference.torch.device("cpu")):
        pytest.skip("this CPU has no native bf16 (AVX-512 BF16 or AMX)")
    monkeypatch.setitem(gate.LIMITS, "max_recomputed", 1.0)  # a 1-epoch model: many ties
    # issue 32: verified on the fewest images the gate can pass on (149, not 300), and the
    # deploy has images after the head the stream takes for it (whole batches of 64: 192)
    monkeypatch.setattr(gate, "AGREEMENT_IMAGES", gate.min_images())
    many = gate.AGREEMENT_IMAGES + 80
    taken = []  # the verification taking the stream's first images, deploy by deploy
    real = engines.Head.readable
    monkeypatch.setattr(engines.Head, "readable", lambda head: taken.append(1) or real(head))
    data = _links(tiny_data, tmp_path / "images-many", many)
    model = layout.model_files_in(tiny_model)[0]
    fast, note = _deploy(tmp_path, "fast", data, model, "engine: torch\n")
    assert note.startswith("torch bf16 (verified: with the band"), note
    assert "recomputed in fp32" in note
    assert taken, "the first deploy verifies on its stream's first images"
    deployed = {k: v for k, v in decoded.items() if k.startswith(str(data))}
    assert len(deployed) == many and set(deployed.values()) == {1}
    taken.clear()
    again, note = _deploy(tmp_path, "again", data, model, "engine: torch\n")
    assert note.startswith("torch bf16 (verified earlier"), note
    assert taken == []  # a cached verdict waits for no head: rows from the first batch on
    assert again["model_prediction"].tolist() == fast["model_prediction"].tolist()
    exact, note = _deploy(tmp_path, "exact", data, model, "precision: fp32\n")
    assert note == "PyTorch fp32"
    assert fast["model_prediction"].tolist() == exact["model_prediction"].tolist()
    assert fast["undecided_reason"].fillna("").tolist() == \
        exact["undecided_reason"].fillna("").tolist()
