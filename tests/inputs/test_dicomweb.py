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
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import orthanc_server
from thumbclf.core.errors import DataError, ImageReadError
from thumbclf.inputs import dicomweb, slides, tiles

pytest.importorskip("dicomweb_client")
pydicom = pytest.importorskip("pydicom")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Orthanc holding two DICOM slides (each with a LABEL, an OVERVIEW and a THUMBNAIL
    instance); yields the server and the first slide's folder (the second's beside it,
    'slide2')."""
    from inputs.test_archives import dicom_slide, jpeg_tiff, picture

    root = tmp_path_factory.mktemp("dicomweb")
    srv, why = orthanc_server.start(root / "orthanc")
    if srv is None:
        pytest.skip(why)
    folders = []
    for name, seed in (("slide", 1), ("slide2", 2)):
        tiff = jpeg_tiff(root / f"{name}.tiff", picture(1500, 1000, seed), pyramid=True)
        folders.append(dicom_slide(root / name, tiff))
        ds = pydicom.dcmread(folders[-1] / "label.dcm")  # the size of the smallest level
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OVERVIEW", "NONE"]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folders[-1] / "overview.dcm")
        srv.upload(sorted(folders[-1].glob("*.dcm")))
    yield srv, folders[0]
    srv.stop()


@pytest.fixture(autouse=True)
def metadata_forgotten():
    """Each test asks the server afresh (the reader keeps series metadata per process)."""
    dicomweb._KNOWN.clear()
    yield
    dicomweb._KNOWN.clear()


def series_uid(folder) -> str:
    return str(pydicom.dcmread(next(folder.glob("1.*.dcm")), stop_before_pixels=True)
               .SeriesInstanceUID)


def never_read_uids(*folders) -> list[str]:
    """The SOP instance UIDs of the slides' LABEL and OVERVIEW instances."""
    out = []
    for folder in folders:
        for f in folder.glob("*.dcm"):
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if any(k in ds.ImageType for k in ("LABEL", "OVERVIEW")):
                out.append(str(ds.SOPInstanceUID))
    return out


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv(dicomweb.USER, orthanc_server.USER)
    monkeypatch.setenv(dicomweb.PASSWORD, orthanc_server.PASSWORD)


def requests_logged(srv) -> list[str]:
    return re.findall(r"\(http\) GET (\S+)", srv.log())


def test_a_series_reads_as_its_folder_and_fetches_only_the_level_it_needs(server, credentials,
                                                                         monkeypatch):
    srv, folder = server
    monkeypatch.setattr(dicomweb, "FRAMES_PER_REQUEST", 2)  # one request per row of 2 tiles
    refs = dicomweb.list_series(srv.dicomweb)
    assert len(refs) == 2
    ref = next(r for r in refs if r.series == series_uid(folder))
    before = len(requests_logged(srv))
    stats = tiles.ReadStats()
    img = dicomweb.thumbnail(ref.url, 256, stats=stats)
    local = slides.thumbnail(folder, 256)
    assert img.size == local.size
    assert np.abs(np.asarray(img, float) - np.asarray(local, float)).max() <= 1
    assert stats.reader == "dicomweb frames" and stats.photometric.startswith("YBR")
    assert stats.encoded_bytes > 0 and stats.level_size[0] < 1500
    frames = [u for u in requests_logged(srv)[before:] if "/frames/" in u]
    cols, rows = (-(-n // 256) for n in stats.level_size)
    per_request = max(1, dicomweb.FRAMES_PER_REQUEST // cols)  # rows asked together
    assert frames and len(frames) == -(-rows // per_request)
    never = never_read_uids(folder)
    assert len(never) == 2  # the label and the overview
    assert not any(uid in u for uid in never for u in requests_logged(srv))  # nothing, ever
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


def deploy(tmp_path, model, thumb_data, *args, name="d", cache="cache"):
    """Deploy ``model`` on ``thumb_data`` in this process; (exit code, stderr, the table)."""
    import pandas as pd
    from conftest import run_cli, write_yaml

    exp = write_yaml(tmp_path / f"{name}.yaml", f"thumbData: {thumb_data}\nmodelAdr: {model}\n"
                     f"hasLabels: false\nbatch_size: 1\nnum_workers: 0\ngradcam: 0\n"
                     f"cache_dir: {tmp_path / cache}\n")
    r = run_cli("deploy", [str(exp), "--quiet", *args])
    table = tmp_path / name / "predictions.csv"
    return r.returncode, r.stderr, (pd.read_csv(table, keep_default_na=False)
                                    if table.is_file() else None)


def frame_requests(srv, since: int) -> list[str]:
    return [u for u in requests_logged(srv)[since:] if "/frames/" in u]


def slide_url(srv, folder) -> str:
    ds = pydicom.dcmread(next(folder.glob("1.*.dcm")), stop_before_pixels=True)
    return f"{srv.dicomweb}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"


def test_a_deploy_reads_every_series_a_dicomweb_url_names(server, credentials, tiny_model,
                                                          tmp_path):
    """Issue 30: thumbData names the service; each series is one row, read over DICOMweb, its
    URL in PATH, with its read record (a second deploy from a table of those URLs with an MPP
    column reads the same slides, from the cache, and says where the MPP came from)."""
    import pandas as pd

    srv, folder = server
    folders = (folder, folder.parent / "slide2")
    code, err, table = deploy(tmp_path, tiny_model, srv.dicomweb)
    assert code == 0, err
    assert sorted(table["PATH"]) == sorted(slide_url(srv, f) for f in folders)
    assert (table["error"] == "").all() and (table["slide_width"] == 1500).all()
    assert (table["read_reader"] == "dicomweb frames").all() and (table["read_level"] == 0).all()
    assert (table["read_level_width"] == 1500).all() and (table["read_level_height"] == 1000).all()
    assert table["read_photometric"].str.startswith("YBR").all()
    assert (table["read_mpp"] == 0.5).all() and (table["read_mpp_source"] == "header").all()
    assert (table["read_bytes"] > 10_000).all() and (table["read_seconds"] > 0).all()
    assert "2 slides read (dicomweb frames 2)" in (tmp_path / "d" / "report.html").read_text()
    pd.DataFrame({"PATH": table["PATH"], "MPP": ["0.25", ""]}).to_csv(tmp_path / "t.csv",
                                                                      index=False)
    code, err, again = deploy(tmp_path, tiny_model, tmp_path / "t.csv", name="t")
    assert code == 0, err
    assert again["PATH"].tolist() == table["PATH"].tolist() and (again["error"] == "").all()
    assert again["read_mpp_source"].tolist() == ["override", "header"]
    assert again["read_mpp"].tolist() == [0.25, 0.5]
    assert again["read_bytes"].tolist() == table["read_bytes"].tolist()  # the record, cached
    logged = requests_logged(srv)
    assert any("/frames/" in u for u in logged)
    never = never_read_uids(*folders)
    assert len(never) == 4 and not any(uid in u for uid in never for u in logged)


def test_a_table_row_naming_a_study_is_one_row_per_series_with_its_label(server, credentials,
                                                                         tmp_path):
    import pandas as pd

    from thumbclf.inputs.samples import discover

    srv, folder = server
    second = slide_url(srv, folder.parent / "slide2")
    study = slide_url(srv, folder).rsplit("/series/", 1)[0]
    pd.DataFrame({"PATH": [study, second], "CLASSIFICATION": ["A", "B"]}).to_csv(
        tmp_path / "t.csv", index=False)
    found = discover(tmp_path / "t.csv", need_labels=True).samples
    assert [(str(s.path), s.label, s.row) for s in found] == [
        (str(Path(slide_url(srv, folder))), "A", 2), (str(Path(second)), "B", 3)]


def test_credentials_in_thumbdata_or_a_table_are_refused_and_not_shown(tmp_path, tiny_model):
    import pandas as pd

    from thumbclf.inputs.samples import discover

    secret = "pw-in-the-file"
    url = f"http://user:{secret}@127.0.0.1:9/dicom-web/studies/1.2/series/3.4"
    code, err, _ = deploy(tmp_path, tiny_model, url)
    assert code == 2 and "without user, password or query" in err and secret not in err, err
    pd.DataFrame({"PATH": [url.replace("user:" + secret + "@", "") + "?token=" + secret]}
                 ).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"t.csv: row 2: http://127.0.0.1:9/.*without") as exc:
        discover(tmp_path / "t.csv", need_labels=False)
    assert secret not in str(exc.value)


def test_resume_skips_the_series_done_and_a_later_deploy_fetches_no_frame(
        server, credentials, tiny_model, tmp_path, monkeypatch):
    """Issue 30: --resume predicts only the series not done; the thumbnail cache, keyed by the
    series UID and the server's instance metadata (asked again, not the URL), serves a later
    deploy without one frame request."""
    srv, _ = server
    read, opened = dicomweb.web_level, []

    def interrupted(series, level):
        opened.append(series.ref.series)
        if len(opened) == 2:
            raise KeyboardInterrupt  # as Ctrl-C while the second slide is read
        return read(series, level)

    monkeypatch.setattr(dicomweb, "web_level", interrupted)
    code, err, table = deploy(tmp_path, tiny_model, srv.dicomweb)
    assert code == 130 and table is None and "--resume" in err, err
    monkeypatch.setattr(dicomweb, "web_level", read)
    dicomweb._KNOWN.clear()  # as a new process: the metadata is asked again
    before = len(requests_logged(srv))
    code, err, table = deploy(tmp_path, tiny_model, srv.dicomweb, "--resume")
    assert code == 0, err
    assert "resuming: 1 images predicted earlier, 1 to go" in (tmp_path / "d" / "run.log"
                                                               ).read_text()
    frames = frame_requests(srv, before)
    assert frames and all(f"/series/{opened[1]}/" in u for u in frames)  # the first: not again
    assert len(table) == 2 and (table["error"] == "").all()
    dicomweb._KNOWN.clear()
    before = len(requests_logged(srv))
    code, err, again = deploy(tmp_path, tiny_model, srv.dicomweb, name="e")  # same cache_dir
    assert code == 0, err
    assert frame_requests(srv, before) == []  # every thumbnail from the cache
    assert sum("/metadata" in u for u in requests_logged(srv)[before:]) >= 2  # the key: asked
    assert again.drop(columns="read_seconds").equals(table.drop(columns="read_seconds"))


def test_a_series_on_a_server_that_stops_answering_is_an_error_row_not_a_hang(
        server, credentials, tiny_model, tmp_path, monkeypatch):
    import pandas as pd

    srv, folder = server
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # the system accepts connections; nothing ever answers
    monkeypatch.setattr(dicomweb, "TIMEOUT_S", (0.5, 0.5))
    monkeypatch.setattr(dicomweb, "RETRIES", 1)
    dead = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web/studies/1.2/series/3.4"
    pd.DataFrame({"PATH": [slide_url(srv, folder), dead]}).to_csv(tmp_path / "t.csv", index=False)
    start = time.perf_counter()
    try:
        code, err, table = deploy(tmp_path, tiny_model, tmp_path / "t.csv")
    finally:
        silent.close()
    assert code == 0, err
    assert time.perf_counter() - start < 120
    assert table["error"].tolist()[0] == ""
    assert re.match(r"http://127.0.0.1:\d+/dicom-web/studies/1.2/series/3.4: the DICOMweb "
                    r"server did not answer \((ReadTimeout|ConnectionError), after 1 retries",
                    table["error"].tolist()[1])


def test_a_deploy_in_worker_processes_exports_and_sorts_dicomweb_thumbnails(
        server, credentials, tiny_model, tmp_path):
    """Decoding worker processes read the series with the environment's credentials; the
    thumbnails are exported and sorted; a DICOMweb slide has no file to copy (sortSlides)."""
    from conftest import run_cli

    srv, folder = server
    before = len(requests_logged(srv))
    (tmp_path / "w.yaml").write_text(
        f"thumbData: {srv.dicomweb}\nmodelAdr: {tiny_model}\nhasLabels: false\ngradcam: 0\n"
        f"num_workers: 1\nsortThumbs: true\nsortSlides: true\nexport_thumbnails: true\n"
        f"cache_dir: {tmp_path / 'cache'}\n")
    r = run_cli("deploy", [str(tmp_path / "w.yaml"), "--quiet"])
    assert r.returncode == 0, r.stderr
    assert frame_requests(srv, before)  # read now, in the worker
    names = sorted(p.name for p in (tmp_path / "w" / "thumbnails").iterdir())
    assert names == sorted(f"{series_uid(f)}.png" for f in (folder, folder.parent / "slide2"))
    assert sorted(p.name for p in (tmp_path / "w" / "sorted").rglob("*.png")) == names


def test_two_shards_of_a_dicomweb_deploy_merge_into_the_one_process_table(
        server, credentials, tiny_model, tmp_path):
    """A SLURM array over an image store: each shard lists the same series in the same order,
    and merge gives the one-process predictions.csv (issue 30)."""
    from conftest import run_cli
    from workflows.test_shards import merge_cli

    srv, _ = server
    exp = tmp_path / "s.yaml"
    exp.write_text(f"thumbData: {srv.dicomweb}\nmodelAdr: {tiny_model}\nhasLabels: false\n"
                   f"gradcam: 0\nnum_workers: 0\nbatch_size: 1\ncache_dir: {tmp_path / 'c'}\n")
    for out, shard in (("one", ()), ("two", ("--shard", "1/2")), ("two", ("--shard", "2/2"))):
        r = run_cli("deploy", [str(exp), "--output", str(tmp_path / out), "--quiet", *shard])
        assert r.returncode == 0, r.stderr
    assert f"thumb_data: {srv.dicomweb}\n" in (tmp_path / "one" / "config.yaml").read_text()
    r = merge_cli(tmp_path / "two")  # reads the shards' config.yaml: the URL as written
    assert r.returncode == 0, r.stderr
    assert ((tmp_path / "two" / "predictions.csv").read_bytes()
            == (tmp_path / "one" / "predictions.csv").read_bytes())


def test_a_dicomweb_slide_is_reviewed_and_corrected_by_its_url(server, credentials, tiny_model,
                                                              tmp_path):
    """The page's previews are the cached thumbnails and each card names the series by its URL;
    the review server takes a correction of that URL, and the exported corrections apply to
    the table (they name the series a later training reads, never a file path)."""
    from thumbclf.outputs import journal
    from thumbclf.workflows import review, review_server

    srv, folder = server
    code, err, table = deploy(tmp_path, tiny_model, srv.dicomweb)
    assert code == 0, err
    before = len(requests_logged(srv))
    text = review.write_review(tmp_path / "d").read_text()
    urls = table["PATH"].tolist()
    assert all(f'"p":"{url}"' in text for url in urls), urls
    assert len(list((tmp_path / "d").rglob("*-s.jpg"))) == 2
    assert frame_requests(srv, before) == []  # from the run's cache
    entry = {"path": urls[1], "classification": "TMA", "reviewer": "r", "at": "now", "seq": 1}
    web = review_server.ReviewServer(tmp_path / "d", 0, tmp_path / "d" / "predictions.csv")
    try:
        assert web.check_entry(entry) is None
    finally:
        web.server_close()
    fixes = journal.corrections([entry], table)
    assert fixes["PATH"].tolist() == [urls[1]]
    fixes.to_csv(tmp_path / "fixes.csv", index=False)
    reviewed = pd.read_csv(review.apply(tmp_path / "d", [tmp_path / "fixes.csv"]),
                           keep_default_na=False)
    assert reviewed[review.REVIEWED_CLASS].tolist()[1] == "TMA"


def test_a_failed_series_is_not_asked_again_for_a_while_then_is(monkeypatch):
    """A deploy's later steps (properties, read record, report) do not wait through a dead
    server's retries again; a long-running process asks again after FAILURE_MEMORY_S."""
    asked = []

    class Down:
        def retrieve_series_metadata(self, study, series):
            asked.append(series)
            raise ConnectionError("down")

    ref = dicomweb.SeriesRef("http://127.0.0.1:9/dw", "1.2", "3.4")
    for _ in range(3):
        with pytest.raises(ImageReadError, match="did not answer"):
            dicomweb.open_series(ref, Down())
    assert asked == ["3.4"]
    monkeypatch.setattr(dicomweb, "FAILURE_MEMORY_S", 0.0)
    with pytest.raises(ImageReadError, match="did not answer"):
        dicomweb.open_series(ref, Down())
    assert asked == ["3.4", "3.4"]


def test_trainings_decode_once_cache_keeps_dicomweb_slides_by_their_metadata(
        server, credentials, tmp_path):
    """Training decodes every input once into the on-disk image cache: a series' entry is
    keyed by its UID and metadata, so a second run decodes nothing and fetches no frame."""
    from thumbclf.inputs import cache
    from thumbclf.inputs.images import Preprocessing

    srv, folder = server
    paths = [Path(u) for u in sorted(r.url for r in dicomweb.list_series(srv.dicomweb))]
    prep = Preprocessing(size=64, slide_size=256)
    first = cache.build(paths, prep, mode="disk", cache_dir=tmp_path, workers=1, progress=False)
    assert not first.errors and first.array.shape[0] == 2
    dicomweb._KNOWN.clear()
    before = len(requests_logged(srv))
    again = cache.build(paths, prep, mode="disk", cache_dir=tmp_path, workers=1, progress=False)
    assert frame_requests(srv, before) == [] and np.array_equal(again.get(np.arange(2)),
                                                                 first.get(np.arange(2)))
