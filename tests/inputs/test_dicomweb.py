"""DICOMweb slides read from a real Orthanc with its DICOMweb plugin.

Issue 30: a slide read over DICOMweb equals the same slide read from its folder within 1/255;
only the frames of the level read are fetched and nothing of a LABEL instance (the server's own
request log is counted); credentials come from the environment and no message shows them; a
server that stops answering gives an error, not a hang. Skipped, with the reason, where Orthanc
cannot start (make test installs it as root).
"""

from __future__ import annotations

import re
import socket
import time

import numpy as np
import pytest

import orthanc_server
from thumbclf.core.errors import ImageReadError
from thumbclf.inputs import dicomweb, slides, tiles

pytest.importorskip("dicomweb_client")
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from inputs.test_archives import dicom_slide, jpeg_tiff, picture

    root = tmp_path_factory.mktemp("dicomweb")
    tiff = jpeg_tiff(root / "d.tiff", picture(1500, 1000, 1), pyramid=True)
    folder = dicom_slide(root / "slide", tiff)
    srv, why = orthanc_server.start(root / "orthanc")
    if srv is None:
        pytest.skip(why)
    srv.upload(sorted(folder.glob("*.dcm")))
    yield srv, folder
    srv.stop()


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv(dicomweb.USER, orthanc_server.USER)
    monkeypatch.setenv(dicomweb.PASSWORD, orthanc_server.PASSWORD)


def requests_logged(srv) -> list[str]:
    return re.findall(r"\(http\) GET (\S+)", srv.log())


def test_a_series_reads_as_its_folder_and_fetches_only_the_level_it_needs(server, credentials):
    srv, folder = server
    refs = dicomweb.list_series(srv.dicomweb)
    assert len(refs) == 1
    before = len(requests_logged(srv))
    stats = tiles.ReadStats()
    img = dicomweb.thumbnail(refs[0].url, 256, stats=stats)
    ref = slides.thumbnail(folder, 256)
    assert img.size == ref.size
    assert np.abs(np.asarray(img, float) - np.asarray(ref, float)).max() <= 1
    assert stats.reader == "dicomweb frames" and stats.photometric.startswith("YBR")
    assert stats.encoded_bytes > 0 and stats.level_size[0] < 1500
    label = str(pydicom.dcmread(folder / "label.dcm", stop_before_pixels=True).SOPInstanceUID)
    frames = [u for u in requests_logged(srv)[before:] if "/frames/" in u]
    assert frames and len(frames) == -(-stats.level_size[1] // 256)  # one request per tile row
    assert not any(label in u for u in requests_logged(srv))  # nothing of the label, ever
    sops = {re.search(r"/instances/([0-9.]+)/", u).group(1) for u in frames}
    assert len(sops) == 1  # the frames of one level only


def test_credentials_come_from_the_environment_and_are_never_shown(server, monkeypatch):
    srv, _ = server
    monkeypatch.setenv(dicomweb.USER, orthanc_server.USER)
    monkeypatch.setenv(dicomweb.PASSWORD, "wrong-" + orthanc_server.PASSWORD)
    url = srv.dicomweb.replace("http://", f"http://{orthanc_server.USER}:hidden@")
    with pytest.raises(ImageReadError, match=r"HTTP 401.*check the credentials") as err:
        dicomweb.list_series(url)
    assert "hidden" not in str(err.value) and orthanc_server.PASSWORD not in str(err.value)


def test_a_server_that_stops_answering_gives_an_error_not_a_hang(monkeypatch):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the system accepts connections; nothing ever answers
    monkeypatch.setattr(dicomweb, "TIMEOUT_S", (0.5, 0.5))
    monkeypatch.setattr(dicomweb, "RETRIES", 1)
    start = time.perf_counter()
    try:
        with pytest.raises(ImageReadError, match="did not answer"):
            dicomweb.list_series(f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web")
    finally:
        silent.close()
    assert time.perf_counter() - start < 10


def test_urls_are_shown_without_credentials_and_parsed_into_study_and_series():
    assert dicomweb.shown("https://u:p@host:8042/dicom-web?token=x") == "https://host:8042/dicom-web"
    assert dicomweb.parse("https://h/dw/studies/1.2/series/3.4/") == ("https://h/dw", "1.2", "3.4")
    assert dicomweb.parse("https://h/dw/studies/1.2") == ("https://h/dw", "1.2", None)
    assert dicomweb.parse("https://h/dw") == ("https://h/dw", None, None)
