"""The review page over HTTP on 127.0.0.1, with the journal behind /api/.

What it guards (docs/concepts/security.md): a per-run secret token that --serve prints in the
page's address, without which every request is refused (a cookie, SameSite=Strict, carries it
for the page's pictures); the Host header (DNS rebinding) and, on writes, the Origin; framing
(frame-ancestors 'none', X-Frame-Options DENY); no file served through a link; bounded request
bodies, read with a timeout.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
from functools import partial
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd

from thumbclf.core import layout
from thumbclf.core import table as table_io
from thumbclf.core.decide import UNDECIDED
from thumbclf.core.errors import OutputError
from thumbclf.core.files import atomic_text
from thumbclf.outputs import journal

log = logging.getLogger(__name__)
HOST = "127.0.0.1"  # the page is served on this machine's loopback interface only
MAX_BODY = 100_000  # bytes of one request's body
READ_TIMEOUT_S = 10.0  # a request that sends nothing for this long is dropped
EXPORT = "corrections.csv"


def write_new(df: pd.DataFrame, folder: Path, name: str) -> Path:
    """``folder/name``, or name-2, -3 ... where another file is there (kept if identical)."""
    stem, suffix = os.path.splitext(name)
    text = table_io.to_csv(df)  # the one table writer: formulas neutralised
    for i in range(1, 10_000):
        target = folder / (name if i == 1 else f"{stem}-{i}{suffix}")
        if not target.exists():
            atomic_text(text, target)
            return target
        if target.read_text(encoding="utf-8", errors="replace") == text:
            return target
    raise OutputError(f"{folder}: too many {name} files; remove old ones")


class ReviewServer(ThreadingHTTPServer):
    """The review folder over HTTP on 127.0.0.1, with the journal behind /api/."""

    daemon_threads = True

    def __init__(self, folder: Path, port: int, table_file: Path):
        self.folder = folder
        self.review = folder / layout.REVIEW
        self.journal = self.review / layout.REVIEW_JOURNAL
        self.token = secrets.token_urlsafe(32)
        self.table, classes = table_io.read(table_file)
        self.paths = {layout.input_text(p) for p in table_io.strings(self.table[table_io.PATH])}
        self.classes = set(classes) | {UNDECIDED}
        super().__init__((HOST, port), partial(_Handler, directory=str(self.review)))
        self.cookie = f"thumbclf-{self.server_address[1]}"  # cookies are per host, not per port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/{layout.REVIEW_PAGE}?token={self.token}"

    def check_entry(self, entry) -> str | None:
        """Why a journal entry is refused, or None."""
        if not isinstance(entry, dict) or set(entry) != set(journal.FIELDS):
            return "an entry has path, classification, reviewer, at and seq"
        if entry["path"] not in self.paths:
            return "path is not a slide of this results folder"
        if entry["classification"] is not None and entry["classification"] not in self.classes:
            return "classification is not a class of this model"
        if not all(isinstance(entry[k], str) and len(entry[k]) <= 200 for k in ("reviewer", "at")):
            return "reviewer and at must be short texts"
        seq = entry["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 < seq < journal.MAX_SEQ:
            return "seq must be a positive whole number"
        return None

    def handle_error(self, request, client_address):
        """A request that failed is logged to run.log, never printed as a traceback."""
        log.debug("review server: a request from %s failed", client_address, exc_info=True)


class _Handler(SimpleHTTPRequestHandler):
    server: ReviewServer
    timeout = READ_TIMEOUT_S  # on the socket: a slow or endless request ends

    def log_message(self, format, *args):  # noqa: A002 - http.server's name
        log.debug("review server: " + format, *args)

    def end_headers(self):
        self.send_header("Content-Security-Policy", "frame-ancestors 'none'")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")  # the token stays in this page
        super().end_headers()

    def _token(self) -> str:
        given = parse_qs(urlsplit(self.path).query).get("token", [""])[0]
        given = given or self.headers.get("X-Thumbclf-Token", "")
        if not given:
            try:
                morsel = SimpleCookie(self.headers.get("Cookie", "")).get(self.server.cookie)
            except CookieError:
                morsel = None
            given = morsel.value if morsel else ""
        return given

    def _allowed(self) -> bool:
        """The token; this machine's own page: the Host (DNS rebinding) and, on writes, the Origin."""
        port = self.server.server_address[1]
        hosts = {f"{HOST}:{port}", f"localhost:{port}"}
        if self.headers.get("Host") not in hosts:
            self.send_error(HTTPStatus.FORBIDDEN, "unknown host")
            return False
        if not hmac.compare_digest(self._token().encode("utf-8", "replace"),
                                   self.server.token.encode()):
            self.send_error(HTTPStatus.FORBIDDEN, "no token: open the address that "
                            "thumbclf review --serve printed")
            return False
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin is not None and origin not in {f"http://{h}" for h in hosts}:
            self.send_error(HTTPStatus.FORBIDDEN, "cross-origin request")
            return False
        return True

    def _reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def translate_path(self, path: str) -> str:
        """The file under review/ (http.server's rules), or nothing where a link is on the way."""
        target = super().translate_path(path)
        root = os.path.abspath(self.server.review)
        part = root
        for name in os.path.relpath(target, root).split(os.sep):
            part = os.path.join(part, name)
            if name in ("..", "") or os.path.islink(part):
                return os.path.join(root, ".refused")  # not there: 404
        return target

    def do_GET(self):  # noqa: N802 - http.server's name
        if not self._allowed():
            return
        route = urlsplit(self.path).path
        if route == "/api/journal":
            body = json.dumps(journal.read(self.server.journal)).encode()
            return self._reply(HTTPStatus.OK, body, "application/json")
        if route == "/":  # the page, keeping the query (the token: its cookie is set below)
            query = urlsplit(self.path).query
            self.path = "/" + layout.REVIEW_PAGE + (f"?{query}" if query else "")
        return super().do_GET()

    def send_response(self, code, message=None):
        super().send_response(code, message)
        if code == HTTPStatus.OK and self.command == "GET" and "token=" in self.path:
            self.send_header("Set-Cookie", f"{self.server.cookie}={self.server.token}; Path=/; "
                             "HttpOnly; SameSite=Strict")

    def do_HEAD(self):  # noqa: N802
        if self._allowed():
            super().do_HEAD()

    def _body(self) -> bytes | None:
        """The request's body, or None after replying why it is refused."""
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
            self._reply(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, b"JSON only", "text/plain")
            return None
        text = self.headers.get("Content-Length") or "0"
        if not text.isdigit():  # also refuses "-1" and "+5"
            self._reply(HTTPStatus.BAD_REQUEST, b"bad Content-Length", "text/plain")
            return None
        if int(text) > MAX_BODY:
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, b"too large", "text/plain")
            return None
        try:
            body = self.rfile.read(int(text))
        except (socket.timeout, OSError):
            body = b""
        if len(body) != int(text):
            self.close_connection = True
            self._reply(HTTPStatus.BAD_REQUEST, b"body shorter than its Content-Length",
                        "text/plain")
            return None
        return body

    def do_POST(self):  # noqa: N802
        if not self._allowed():
            return
        route = urlsplit(self.path).path
        if route == "/api/journal":
            body = self._body()
            if body is None:
                return None
            try:
                entry = json.loads(body)
            except (ValueError, RecursionError):  # also 50,000 nested levels
                return self._reply(HTTPStatus.BAD_REQUEST, b"not JSON", "text/plain")
            why = self.server.check_entry(entry)
            if why:
                return self._reply(HTTPStatus.BAD_REQUEST, why.encode(), "text/plain")
            try:
                journal.append(self.server.journal, entry)
            except OutputError as exc:
                log.error("%s", exc)
                return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc).encode("utf-8", "replace"),
                                   "text/plain")
            return self._reply(HTTPStatus.NO_CONTENT, b"", "text/plain")
        if route == "/api/export":
            return self._export()
        return self._reply(HTTPStatus.NOT_FOUND, b"not found", "text/plain")

    def _export(self):
        df = journal.corrections(journal.read(self.server.journal), self.server.table)
        try:
            target = write_new(df, self.server.review, EXPORT)
        except OutputError as exc:
            return self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc).encode("utf-8", "replace"),
                               "text/plain")
        text = f"wrote {len(df)} corrections to {target}"
        log.info("%s", text)
        return self._reply(HTTPStatus.OK, text.encode("utf-8", "replace"), "text/plain")
