"""core/privacy.py: matplotlib's cache goes into the cache folder, not the home folder."""

import os
import sys

from thumbclf.core import privacy


def test_matplotlibs_cache_goes_into_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    privacy.keep_caches_in(tmp_path)
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / privacy.MATPLOTLIB)


def test_without_a_cache_folder_a_temporary_one_is_used(monkeypatch):
    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    privacy.keep_caches_in(None)
    folder = os.environ["MPLCONFIGDIR"]
    assert os.path.isdir(folder) and os.path.basename(folder).startswith("thumbclf-mpl-")


def test_a_folder_the_user_chose_or_an_imported_matplotlib_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))
    privacy.keep_caches_in(tmp_path)
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("MPLCONFIGDIR")
    monkeypatch.setitem(sys.modules, "matplotlib", object())
    privacy.keep_caches_in(tmp_path)
    assert "MPLCONFIGDIR" not in os.environ
