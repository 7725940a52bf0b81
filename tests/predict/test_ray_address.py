"""predict/ray_address.py: joining a Ray cluster is bounded as a whole (issue 33, item 19)."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from thumbclf.predict.ray_address import unreachable


def test_a_port_that_is_open_but_not_ray_is_refused_within_the_bound():
    """ray_address pointing at an open port that is not Ray's (the dashboard's 8265 for the
    GCS's 6379) passed the TCP probe, then Ray waited forever."""
    http = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)  # accepts (the kernel does), never says a word
    try:
        started = time.monotonic()
        why = unreachable(f"127.0.0.1:{http.server_address[1]}", timeout=5)
        assert why is not None and "not as Ray does" in why
        why = unreachable(f"127.0.0.1:{silent.getsockname()[1]}", timeout=1)
        assert why is not None and "no answer" in why
        assert time.monotonic() - started < 5
    finally:
        http.shutdown()
        silent.close()
    assert unreachable("auto") is None
