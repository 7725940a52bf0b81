"""Nothing lingers outside the results and cache folders: the libraries' own caches and
telemetry are kept in, or off.

- matplotlib writes its font list (and reads its settings) under ~/.config and ~/.cache;
  thumbclf points it (MPLCONFIGDIR) into the cache folder, unless the user chose a folder
  or matplotlib was imported before thumbclf ran;
- OpenVINO's and NNCF's telemetry (a client id in ~/intel, usage statistics sent to Google
  Analytics) is never loaded (``predict.inference.no_telemetry``).
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

MATPLOTLIB = "matplotlib"  # the cache folder's subfolder of matplotlib's font list


def keep_caches_in(cache_root: Path | None) -> None:
    """Send matplotlib's cache into ``cache_root`` (None, or a folder that cannot be made: a
    temporary folder removed at exit). Call before matplotlib is imported."""
    if MATPLOTLIB in sys.modules or "MPLCONFIGDIR" in os.environ:
        return
    folder = None
    if cache_root is not None:
        try:  # an unusable cache folder is the run's one-line error, not matplotlib's warning
            (Path(cache_root) / MATPLOTLIB).mkdir(parents=True, exist_ok=True)
            folder = str(Path(cache_root) / MATPLOTLIB)
        except OSError:
            pass
    if folder is None:
        folder = tempfile.mkdtemp(prefix="thumbclf-mpl-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["MPLCONFIGDIR"] = folder
