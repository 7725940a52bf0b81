"""Is a Ray address worth joining? A bounded check of its port before Ray's own connection,
which retries for many minutes, deaf to SIGTERM, and why Ray refused where it did (issue 33)."""

from __future__ import annotations

import os
import socket
import time

CONNECT_TIMEOUT = 10.0  # seconds to wait for a Ray cluster's port to answer


def address_to_use(configured: str | None) -> tuple[str, str]:
    """The Ray a run joins or starts, and where that came from (for its errors): the
    experiment's ``ray_address``, else the environment's RAY_ADDRESS, else ``'local'``: a new
    instance on this machine, even where a cluster started with ``ray start`` runs on it (given
    no address, Ray joins that cluster, and refuses the CPU count a new instance is given)."""
    for address, origin in ((configured, "ray_address"),
                            (os.environ.get("RAY_ADDRESS", "").strip(), "RAY_ADDRESS")):
        if address:  # 'local' (Ray's word for an instance of its own) is no cluster to join
            return (address, origin) if address != "local" else ("local", "")
    return "local", ""


# An HTTP/2 client's opening (the preface and an empty SETTINGS frame): Ray's GCS and Ray
# Client speak gRPC, which answers it with its own SETTINGS frame
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT) -> str | None:
    """Why the host:port of a Ray address does not accept a connection within ``timeout``, or
    does not answer as Ray's gRPC does (the dashboard's port 8265 for the GCS's 6379: Ray would
    wait forever, issue 33), the whole exchange bounded by ``timeout``; None when it answers,
    or for addresses without a port ('auto': Ray finds it)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection((host or "localhost", int(port)), timeout=timeout) as conn:
            conn.sendall(_H2_PREFACE)
            head = b""
            while len(head) < 9:
                conn.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = conn.recv(9 - len(head))
                if not chunk:
                    break
                head += chunk
    except socket.timeout:
        return "no answer from that port: is it a Ray cluster's address (the GCS, default 6379)?"
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    if len(head) < 9 or head[3] != 0x04:  # not an HTTP/2 SETTINGS frame: not gRPC
        return ("the port answers, but not as Ray does (the dashboard's 8265, or another "
                "service?); give the GCS address, default port 6379")
    return None


def why_not_joined(exc: BaseException) -> str:
    """The first line of why Ray could not start or join, or, where the cluster refused for
    want of its token (Ray's token authentication, on by default since Ray 2.59, which the
    error says only deep in its causes), what to do about it."""
    cause: BaseException | None = exc
    while cause is not None:
        if "Authentication token is missing" in str(cause):
            return ("the cluster asks for its token (Ray's token authentication): run with "
                    "RAY_AUTH_MODE=token, the token in ~/.ray/auth_token or RAY_AUTH_TOKEN")
        cause = cause.__cause__ or cause.__context__
    return str(exc).splitlines()[0]
