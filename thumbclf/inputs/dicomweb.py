"""DICOMweb slides (issue 30): a WSI series on a DICOMweb server read into a thumbnail without
a local copy. ``thumbData`` (or a table's PATH) may name a service, a study or a series; each
series is one input, held as a Path whose text is its URL (``layout.web_url``).

The series' metadata (WADO-RS, no pixels) gives every instance's kind and size; only the frames
of the smallest level that reaches the thumbnail size are fetched (a THUMBNAIL instance where it
is large enough), one request per tile row, and the frames of LABEL and OVERVIEW instances never
are. Authentication comes from the environment (THUMBCLF_DICOMWEB_TOKEN: a bearer token;
THUMBCLF_DICOMWEB_USER and THUMBCLF_DICOMWEB_PASSWORD: basic) or from ~/.netrc (requests reads
it), never from the experiment file, and no message shows it. Every request has a timeout
(TIMEOUT_S) and is retried (RETRIES, with backoff) on connection errors and 429/5xx answers, so a
server that stops answering gives an error, not a hang. A series' cache key is its UID and the
facts of its instances as the server describes them (never the URL or its credentials); the
metadata is asked once per process and series (after a failure, not again for FAILURE_MEMORY_S,
so that a deploy's later steps do not wait through the retries again). Needs ``pip install "thumbclf[dicomweb]"``
(dicomweb-client).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from thumbclf.core.errors import INCOMPLETE, NOT_FOUND, UNREADABLE, DataError, ImageReadError
from thumbclf.core.layout import web_url
from thumbclf.inputs import dicom, tiles

INSTALL = 'pip install "thumbclf[dicomweb]"'
TIMEOUT_S = (10.0, 60.0)  # connect, read: per request
RETRIES = 3  # per request, with backoff 0.5 s, 1 s, 2 s, on connection errors and 429/5xx
TOKEN, USER, PASSWORD = ("THUMBCLF_DICOMWEB_TOKEN", "THUMBCLF_DICOMWEB_USER",
                         "THUMBCLF_DICOMWEB_PASSWORD")
SM = "SM"  # the modality of slide microscopy series
ANY_SYNTAX = (("application/octet-stream", "*"),)  # frames as stored
_SERIES = re.compile(r"^(?P<root>.*?)/studies/(?P<study>[0-9.]+)(/series/(?P<series>[0-9.]+))?/?$")


@dataclass(frozen=True)
class SeriesRef:
    """One slide on a DICOMweb server: the service root, the study and the series."""

    root: str
    study: str
    series: str

    @property
    def url(self) -> str:
        return f"{self.root}/studies/{self.study}/series/{self.series}"


def is_url(text) -> bool:
    """True for an input that names a DICOMweb service, study or series (URL or Path)."""
    return web_url(text) is not None


def url_problem(text, where: str) -> str | None:
    """Why an input's URL is refused (None: not a URL, or fine): credentials or a query in it.
    They come from the environment or ~/.netrc, never from the experiment file or a table; the
    message does not repeat them."""
    url = web_url(text)
    parts = urlsplit(url) if url is not None else None
    if parts is None or not (parts.username or parts.password or parts.query or parts.fragment):
        return None
    return (f"{where}: {shown(url)}: write the DICOMweb URL without user, password or query; "
            f"credentials come from {TOKEN}, or {USER} and {PASSWORD}, or ~/.netrc")


def check_url(text, where: str) -> None:
    """DataError naming ``url_problem``, if any."""
    problem = url_problem(text, where)
    if problem:
        raise DataError(problem)


def series_urls(path, where: str) -> list[str] | None:
    """The series URLs of an input naming a DICOMweb service or study (None: a file or a
    series, kept as it is); DataError, prefixed with ``where``, when the server does not list
    them."""
    url = web_url(path)
    if url is None or parse(url)[2] is not None:
        return None
    try:
        return [ref.url for ref in list_series(url)]
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None


def thumb_data_series(thumb_data, need_labels: bool) -> list[str]:
    """The series URLs of the DICOMweb service, study or series that thumbData names."""
    url = shown(web_url(thumb_data) or str(thumb_data))
    if need_labels:
        raise DataError(f"thumbData: {url}: a DICOMweb URL has no labels; set hasLabels: "
                        "false, or give a table with PATH (the series URLs) and CLASSIFICATION")
    found = series_urls(thumb_data, "thumbData") or [url]
    if parse(url)[2] is None and found == [url]:
        raise DataError(f"thumbData: {url}: no slide-microscopy series (modality SM) there")
    return found


def series_ref(path) -> SeriesRef:
    """The series an input (a Path or URL of one series) names; ImageReadError otherwise."""
    url = web_url(path) or str(path)
    root, study, uid = parse(url)
    if not (study and uid):
        raise ImageReadError(f"{shown(url)}: name one series (.../studies/UID/series/UID)")
    return SeriesRef(root, study, uid)


def shown(url: str) -> str:
    """A URL as messages show it: without user, password, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse(url: str) -> tuple[str, str | None, str | None]:
    """(service root, study or None, series or None) of a DICOMweb URL."""
    clean = shown(url).rstrip("/")
    m = _SERIES.match(clean)
    if m is None:
        return clean, None, None
    return m.group("root"), m.group("study"), m.group("series")


def session():
    """A requests session: retries with backoff, a timeout on every request, auth from the
    environment (else ~/.netrc, which requests reads)."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    class _Timeout(HTTPAdapter):
        def send(self, request, **kwargs):
            if kwargs.get("timeout") is None:
                kwargs["timeout"] = TIMEOUT_S
            return super().send(request, **kwargs)

    s = requests.Session()
    retry = Retry(total=RETRIES, connect=RETRIES, read=RETRIES, backoff_factor=0.5,
                  status_forcelist=(429, 500, 502, 503, 504), allowed_methods=("GET",))
    for prefix in ("http://", "https://"):
        s.mount(prefix, _Timeout(max_retries=retry))
    if os.environ.get(TOKEN):
        s.headers["Authorization"] = f"Bearer {os.environ[TOKEN]}"
    elif os.environ.get(USER):
        s.auth = (os.environ[USER], os.environ.get(PASSWORD, ""))
    return s


_CLIENTS: dict[tuple, object] = {}  # one per service, process and credentials: kept alive


def client(root: str):
    """A DICOMweb client of the service at ``root``: one per process (never a forked parent's
    connection), credentials and retry setting, so that its connection serves every slide."""
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise ImageReadError(f"{shown(root)}: reading DICOMweb slides needs dicomweb-client; "
                             f"{INSTALL}") from None
    key = (root, os.getpid(), RETRIES, *(os.environ.get(k) for k in (TOKEN, USER, PASSWORD)))
    web = _CLIENTS.get(key)
    if web is None:
        web = DICOMwebClient(root, session=session())
        web.set_http_retry_params(retry=False)  # the session retries, as the module says
        if len(_CLIENTS) >= 64:
            _CLIENTS.clear()
        _CLIENTS[key] = web
    return web


def _failed(where: str, exc: Exception, missing: str = NOT_FOUND) -> ImageReadError:
    """A request's failure as one line naming the URL (never its credentials); ``missing``: the
    kind an answer 404 stands for (a series not found; frames of a listed series: incomplete)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    why = f"HTTP {status}" if status else type(exc).__name__
    hint = ("; check the credentials (THUMBCLF_DICOMWEB_TOKEN, or _USER and _PASSWORD, or "
            "~/.netrc)" if status in (401, 403) else "")
    return ImageReadError(f"{shown(where)}: the DICOMweb server did not answer ({why}, after "
                          f"{RETRIES} retries, {TIMEOUT_S[1]:g} s timeout){hint}",
                          kind=missing if status == 404 else UNREADABLE)


def list_series(url: str) -> list[SeriesRef]:
    """The slide-microscopy series a DICOMweb URL names (a service, a study or a series)."""
    root, study, series = parse(url)
    if study and series:
        return [SeriesRef(root, study, series)]
    web = client(root)
    try:
        found = web.search_for_series(study_instance_uid=study, search_filters={"Modality": SM},
                                      get_remaining=True)
    except Exception as exc:  # noqa: BLE001 - requests' and the client's errors alike
        raise _failed(url, exc) from None
    out = [SeriesRef(root, _value(s, "0020000D"), _value(s, "0020000E")) for s in found]
    return sorted(out, key=lambda r: (r.study, r.series))


def _value(meta: dict, tag: str, default=None):
    values = meta.get(tag, {}).get("Value") or []
    return values[0] if values else default


@dataclass
class WebSeries:
    """A DICOMweb slide's levels and thumbnails (as dicom.Instance, named by SOP instance UID),
    the client, and what was fetched."""

    ref: SeriesRef
    levels: tuple[dicom.Level, ...]
    thumbnails: tuple[dicom.Instance, ...]
    web: object
    requests: int = 0
    nbytes: int = 0
    fetched: list = field(default_factory=list)  # SOP instance UIDs whose frames were fetched


# the attributes dicom.instance_of reads (the rest of the metadata is not parsed): SOP class and
# instance, series, image type, rows, columns, frames, photometric, total pixel matrix,
# dimension organisation, concatenation, shared and per-frame functional groups, optical path,
# manufacturer, transfer syntax
WANTED_TAGS = frozenset((
    "00080016", "00080018", "0020000E", "00080008", "00280010", "00280011", "00280008",
    "00280004", "00480006", "00480007", "00209311", "00209161", "00209162", "00209163",
    "00209228", "52009229", "52009230", "00480105", "00080070", "00020010", "00083002"))
_KNOWN: dict[str, tuple | ImageReadError] = {}  # series URL -> (levels, thumbnails, key), or
# why the server did not answer: its metadata is asked once a process
MAX_KNOWN = 4096
FAILURE_MEMORY_S = 300.0  # a series whose server did not answer is not asked again this long


def _describe(ref: SeriesRef, web=None) -> tuple:
    """A series' levels, THUMBNAIL instances and cache key, from its metadata (no pixels)."""
    known = _KNOWN.get(ref.url)
    if isinstance(known, ImageReadError):  # asked lately: not again, with all its retries
        if time.monotonic() - known.at < FAILURE_MEMORY_S:
            raise ImageReadError(*known.args, kind=known.kind)
        known = None
    if known is not None:
        return known
    import pydicom

    web = web or client(ref.root)
    try:
        metas = web.retrieve_series_metadata(ref.study, ref.series)
    except Exception as exc:  # noqa: BLE001
        failure = _failed(ref.url, exc)
        failure.at = time.monotonic()
        _KNOWN[ref.url] = failure
        raise ImageReadError(*failure.args, kind=failure.kind) from None
    found = []
    for meta in metas:
        meta = {k: v for k, v in meta.items() if k in WANTED_TAGS}
        ds = pydicom.Dataset.from_json(meta, bulk_data_uri_handler=lambda *_: b"")  # no bulk
        syntax = str(_value(meta, "00020010", "") or _value(meta, "00083002", "") or "")
        inst = dicom.instance_of(ds, Path(str(ds.get("SOPInstanceUID", ""))), 0, syntax)
        if inst is not None:
            found.append(inst)
    volumes = [i for i in found if i.kind == "VOLUME"]
    if not volumes:
        raise ImageReadError(f"{shown(ref.url)}: no VOLUME instances in this series",
                             kind=INCOMPLETE)
    facts = sorted(f"{i.path}:{i.kind}:{i.width}x{i.height}:{i.tile_w}x{i.tile_h}:{i.frames}:"
                   f"{i.syntax}:{i.photometric}" for i in found)
    key = f"{ref.series}|" + hashlib.sha1("|".join(facts).encode()).hexdigest()
    known = (dicom.group_levels(volumes, Path(shown(ref.url))),
             tuple(i for i in found if i.kind == "THUMBNAIL"), key)
    if len(_KNOWN) >= MAX_KNOWN:
        _KNOWN.clear()
    _KNOWN[ref.url] = known
    return known


def open_series(ref: SeriesRef, web=None) -> WebSeries:
    """A DICOMweb slide from its series metadata (no pixels), checked as a folder is."""
    web = web or client(ref.root)
    levels, thumbs, _ = _describe(ref, web)
    return WebSeries(ref, levels, thumbs, web)


def fingerprint(path) -> str:
    """The cache key of a series: its UID and the facts of its instances (UIDs, kinds, sizes,
    frames, syntax, colour) as the server describes them; not its URL or credentials."""
    return _describe(series_ref(path))[2]


def properties(path) -> tuple:
    """As ``dicom.properties``: vendor, objective power, MPP (x, y), levels, width, height."""
    ref = series_ref(path)
    return dicom.properties(dicom.Series(Path(shown(ref.url)), _describe(ref)[0], ()))


def _codec(data: bytes) -> str:
    if data[:2] == b"\xff\xd8":
        return "jpeg"
    if data[:2] == b"\xff\x4f" or data[4:8] == b"jP  ":
        return "jpeg2000"
    return "raw"


FRAMES_PER_REQUEST = 64  # rows of tiles are asked together up to this many frames


def web_level(series: WebSeries, level: dicom.Level) -> tiles.TiledLevel:
    """A level whose frames are fetched from the server: one request for as many rows of tiles
    as hold up to FRAMES_PER_REQUEST frames (at least one row), per instance."""
    inst = level.parts[0]
    cols = -(-level.width // inst.tile_w)
    where: dict[tuple[int, int], tuple[str, int]] = {}
    for part in level.parts:
        for k in range(part.frames):
            index = part.frame_offset + k
            pos = part.positions[k] if part.positions is not None else (index % cols, index // cols)
            where.setdefault(pos, (str(part.path), k + 1))  # first plane and path only
    ref = series.ref
    out = tiles.TiledLevel(level.width, level.height, inst.tile_w, inst.tile_h,
                           Path(shown(ref.url)), lambda tx, ty: None, "jpeg",
                           rgb=inst.photometric == "RGB", photometric=inst.photometric)

    per_request = max(1, FRAMES_PER_REQUEST // cols)
    ahead: dict[int, dict[int, bytes]] = {}  # rows fetched with an earlier one

    def fetch_row(ty: int) -> dict[int, bytes]:
        if ty in ahead:
            return ahead.pop(ty)
        rows = range(ty, ty + per_request)
        wanted: dict[str, list[tuple[int, int, int]]] = {}
        for (tx, y), (sop, frame) in where.items():
            if y in rows:
                wanted.setdefault(sop, []).append((frame, tx, y))
        got: dict[int, dict[int, bytes]] = {y: {} for y in rows}
        for sop, triples in wanted.items():
            triples.sort()
            try:
                frames = series.web.retrieve_instance_frames(
                    ref.study, ref.series, sop, [f for f, _, _ in triples],
                    media_types=ANY_SYNTAX)
            except Exception as exc:  # noqa: BLE001
                raise _failed(ref.url, exc, missing=INCOMPLETE) from None
            series.requests += 1
            series.fetched.append(sop)
            for (_, tx, y), data in zip(triples, frames):
                got[y][tx] = data
                series.nbytes += len(data)
        first = next((d for r in got.values() for d in r.values()), None)
        if first is not None:
            out.codec = _codec(first)
        ahead.update({y: r for y, r in got.items() if y != ty})
        return got[ty]

    out.fetch_row = fetch_row
    return out


def thumbnail(url, long_side: int, *, stats: tiles.ReadStats | None = None,
              budget_s: float = 120.0, web=None) -> Image.Image:
    """The RGB thumbnail of one DICOMweb series (its URL or Path), long side ``long_side``."""
    ref = series_ref(url)
    series = open_series(ref, web)
    stats = stats if stats is not None else tiles.ReadStats()
    start = time.perf_counter()
    base = series.levels[0]
    out = (max(1, round(base.width * long_side / max(base.width, base.height))),
           max(1, round(base.height * long_side / max(base.width, base.height))))
    candidates = [*series.levels, *(dicom.Level((t,)) for t in series.thumbnails)]
    i = tiles.choose_level([(lv.width, lv.height) for lv in candidates], out)
    level = web_level(series, candidates[i])
    stats.reader, stats.level = "dicomweb frames", min(i, len(series.levels))
    stats.level_size, stats.photometric = (level.width, level.height), level.photometric
    img = tiles.render(level, out, deadline=time.perf_counter() + budget_s,
                       where=shown(ref.url), budget_s=budget_s, stats=stats)
    stats.encoded_bytes, stats.seconds = series.nbytes, time.perf_counter() - start
    return img
