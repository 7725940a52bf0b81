"""workflows/prepare.py: what training and pretraining check and decode before the first epoch."""

from types import SimpleNamespace

import pytest

from thumbclf.core.errors import DataError
from thumbclf.inputs import synth
from thumbclf.inputs.images import Preprocessing
from thumbclf.inputs.samples import discover
from thumbclf.workflows.prepare import load_images


def _params(tmp_path):
    return SimpleNamespace(cache_root=tmp_path / "cache", slide_cache=tmp_path / "slides",
                           num_workers=0)


def test_unreadable_images_are_left_out_or_stop_the_run_past_the_limit(tmp_path, caplog):
    data = tmp_path / "data"
    synth.generate(data, per_class=3, seed=1, sides=(40, 60), classes=("IHC", "TMA"))
    (data / "labels.csv").unlink()
    (data / "IHC" / "broken.png").write_bytes(b"not an image")
    samples = discover(data, need_labels=True)
    prep = Preprocessing(size=32)
    decoded = load_images(_params(tmp_path), samples, prep, tmp_path, mode="memory",
                          max_failed=0.5, progress=False)
    assert len(decoded.errors) == 1 and "1 of 7 images could not be read" in caplog.text
    with pytest.raises(DataError, match=r"1 of 7 images \(14%\) cannot be read, more than "
                                        r"max_failed_fraction \(10%\)"):
        load_images(_params(tmp_path), samples, prep, tmp_path, mode="memory", max_failed=0.1,
                    progress=False)
