"""thumbclf review: the page in a real browser (Chromium driven by Selenium), the served journal,
and --apply. The results folders are made by the test (a predictions table over a few generated
pictures); no model is needed for the page. The browser tests skip, saying why, where Chromium,
its driver or Selenium is missing (`make test` installs Chromium as root)."""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from thumbclf import cli
from thumbclf.core import layout
from thumbclf.inputs.corrections import read_table_of
from thumbclf.inputs.samples import read_table
from thumbclf.outputs import review as review_page
from thumbclf.workflows import review as review_flow

CLASSES = ["Biopsy", "IHC", "TMA"]
MARKUP = "<b>bold<img src=x onerror=document.title='pwned'>"  # a file name (no '/' in names)
logging.getLogger("selenium").setLevel(logging.WARNING)  # its requests are not the tests' story
OPEN_LIMIT_S = 10.0  # the 20,000-slide page opens within this (measured 0.6 s on a shared 2-core machine)


def results_folder(root: Path, names: list[str], *, classes=CLASSES, seed=0) -> Path:
    """A deploy results folder: pictures, predictions.csv (3 Undecided, then decided ones, some
    disagreeing with their labels), config.yaml and run.log."""
    rng = np.random.default_rng(seed)
    pictures = root / "slides"
    pictures.mkdir(parents=True)
    rows = []
    for i, name in enumerate(names):
        path = pictures / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
        p = np.sort(rng.dirichlet([1, 1, 1]))[::-1]
        p = np.roll(p, i % 3)
        undecided = i < 3
        rows.append({"PATH": str(path), "CLASSIFICATION": classes[(i + 1) % 3],
                     **dict(zip(classes, p)),
                     "model_prediction": "Undecided" if undecided else classes[int(np.argmax(p))],
                     "undecided_reason": ("unfamiliar" if i == 2 else "low confidence") if undecided else "",
                     "error": "", "threshold": 0.9})
    folder = root / "deploy"
    folder.mkdir()
    pd.DataFrame(rows).to_csv(folder / "predictions.csv", index=False)
    (folder / "config.yaml").write_text("thumb_data: slides\nsort_thumbs: false\n")
    (folder / "run.log").write_text("")
    return folder


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- the browser


# `browser`: Chromium driven by Selenium, from tests/conftest.py (the docs' tests use it too)


def open_page(browser, url: str, timeout: float = 30.0) -> float:
    """Load the page; seconds until its script says it is ready."""
    started = time.perf_counter()
    browser.get(url)
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1", timeout)
    return time.perf_counter() - started


def wait_for(condition, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def press(browser, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).send_keys(keys).perform()


def current(browser) -> str:
    return browser.execute_script("return document.querySelector('.card.current .name').textContent")


def card_review(browser, name: str) -> str:
    return browser.execute_script(
        "for (const c of document.querySelectorAll('.card')) if (c.querySelector('.name')"
        ".textContent === arguments[0]) return c.querySelector('.reviewed').textContent;", name)


def test_relabel_with_the_keyboard_reload_and_export(browser, tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c", "d", "e", "f"])
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    page = folder / "review" / "index.html"
    assert page.is_file() and len(list((folder / "review" / "previews").glob("*.jpg"))) == 12
    open_page(browser, page.as_uri())
    legend = browser.find_element("id", "keys").text
    assert "1 Biopsy" in legend and "2 IHC" in legend and "0 leave Undecided" in legend
    browser.find_element("id", "who").send_keys("AB")
    browser.execute_script("document.activeElement.blur()")
    first = current(browser)
    press(browser, "2")                     # first -> IHC, on to the next
    second = current(browser)
    press(browser, "0")                     # second: leave Undecided
    third = current(browser)
    press(browser, "3")                     # third -> TMA ...
    press(browser, "u")                     # ... undone: back on the third, no correction
    assert current(browser) == third and card_review(browser, third) == ""
    press(browser, "j")
    fourth = current(browser)
    press(browser, "1")
    assert len({first, second, third, fourth}) == 4
    browser.refresh()                       # kept in the browser's storage
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1")
    assert card_review(browser, first) == "reviewed: IHC"
    assert card_review(browser, second) == "reviewed: left Undecided"
    assert card_review(browser, third) == ""
    assert "3 corrections in all" in browser.find_element("id", "status").text
    (tmp_path / "dl").mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                            "downloadPath": str(tmp_path / "dl")})
    browser.find_element("id", "export").click()
    exported = wait_for(lambda: (tmp_path / "dl" / "corrections.csv").is_file()
                        and (tmp_path / "dl" / "corrections.csv"))
    got = read_table_of(exported)           # an ordinary thumbclf input table
    assert {(c.path.name, c.label, c.reviewer) for c in got} == {
        (first, "IHC", "AB"), (second, "Undecided", "AB"), (fourth, "Biopsy", "AB")}
    assert all(c.path.is_absolute() and c.path.is_file() for c in got)
    assert list(read_table(exported).columns) == review_flow.COLUMNS


def test_file_names_and_classes_with_markup_show_as_text(browser, tmp_path):
    classes = ["Biopsy", "<i>IHC</i>", "TMA&amp;"]
    folder = results_folder(tmp_path, ["plain", MARKUP, "x"], classes=classes, seed=1)
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    open_page(browser, (folder / "review" / "index.html").as_uri())
    names = browser.execute_script("return [...document.querySelectorAll('.card .name')].map(e => e.textContent)")
    assert MARKUP + ".png" in names
    assert browser.find_elements("css selector", ".card .name *") == []  # no element made from data
    assert browser.find_elements("css selector", "img[src='x'], i, b") == []
    assert browser.title.startswith("Review:") and "pwned" not in browser.title
    legend = browser.find_element("id", "keys").text
    assert "2 <i>IHC</i>" in legend and "3 TMA&amp;" in legend
    press(browser, "2")
    first = browser.execute_script("return document.querySelector('.card .reviewed').textContent")
    assert first == "reviewed: <i>IHC</i>"
    press(browser, "k\n")                   # large view of the first: still text
    assert browser.find_element("css selector", "#large .name").text == names[0]
    assert browser.find_elements("css selector", "#large .name *") == []


def test_a_20000_slide_page_opens_quickly_and_navigates(browser, tmp_path):
    """20,000 rows of page data sharing one preview picture (not 20,000 real images)."""
    n = 20_000
    rng = np.random.default_rng(2)
    probs = rng.dirichlet([1, 1, 1], n)
    table = pd.DataFrame({"PATH": [f"/archive/slide_{i:05d}.svs" for i in range(n)],
                          **{c: probs[:, j] for j, c in enumerate(CLASSES)}})
    top = probs.max(axis=1)
    table["model_prediction"] = np.where(top < 0.9, "Undecided", np.array(CLASSES)[probs.argmax(axis=1)])
    review = tmp_path / "review"
    records = review_page.items(table, CLASSES, review=review)
    shared = review / "previews" / "shared-s.jpg"
    shared.parent.mkdir(parents=True)
    Image.new("RGB", (200, 150), (230, 170, 210)).save(shared)
    for r in records:
        r["s"] = r["b"] = "previews/shared-s.jpg"
    page = review_page.write(review, records, CLASSES, title="20,000 slides", page="big-test")
    seconds = open_page(browser, page.as_uri(), timeout=60)
    print(f"20,000-slide page ready in {seconds:.2f} s ({page.stat().st_size / 1e6:.1f} MB)")
    assert seconds < OPEN_LIMIT_S
    undecided = int((table["model_prediction"] == "Undecided").sum())
    assert browser.execute_script("return document.querySelectorAll('.card').length") <= 300
    press(browser, "j" * 200)               # past the first chunk of cards
    assert f"201 of {undecided} shown" in browser.find_element("id", "status").text
    loaded = browser.execute_script("return [...document.querySelectorAll('img.thumb')].filter(i => i.getAttribute('src')).length")
    assert 0 < loaded < 400                 # pictures load lazily, near the view only


# ---------------------------------------------------------------------------- served on 127.0.0.1


@pytest.fixture
def served(tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    box: dict = {}
    ready = threading.Event()

    def on_ready(server):
        box["server"] = server
        ready.set()

    thread = threading.Thread(target=review_flow.serve, args=(folder, 0),
                              kwargs={"ready": on_ready}, daemon=True)
    thread.start()
    assert ready.wait(60)
    yield folder, box["server"]
    box["server"].shutdown()
    thread.join(10)
    assert not (folder / layout.LOCK).exists()  # the folder's lock is released


def request(server, method: str, path: str, body: bytes | None = None, headers=None):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=body, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
    r = conn.getresponse()
    return r.status, r.read()


def test_served_page_saves_corrections_in_the_journal(browser, served):
    folder, server = served
    assert server.server_address[0] == "127.0.0.1"
    open_page(browser, server.url)
    assert "saved to the results folder" in browser.find_element("id", "status").text
    first = current(browser)
    press(browser, "3")
    journal = folder / "review" / "journal.jsonl"
    wait_for(lambda: journal.is_file() and journal.read_text().count("\n") == 1)
    entry = json.loads(journal.read_text())
    assert Path(entry["path"]).name == first and entry["classification"] == "TMA"
    press(browser, "u")                     # an undo is appended, never a line removed
    wait_for(lambda: journal.read_text().count("\n") == 2)
    assert current(browser) == first
    press(browser, "2")
    wait_for(lambda: journal.read_text().count("\n") == 3)
    browser.execute_script("localStorage.clear()")  # the journal, not the browser, keeps it
    browser.refresh()
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1")
    assert card_review(browser, first) == "reviewed: IHC"
    status, text = request(server, "POST", "/api/export", headers={"Content-Length": "0"})
    assert status == 200 and b"1 corrections" in text
    exported = read_table_of(folder / "review" / "corrections.csv")
    assert [(c.path.name, c.label) for c in exported] == [(first, "IHC")]


def test_server_refuses_other_hosts_origins_and_entries(served):
    folder, server = served
    port = server.server_address[1]
    path = os.path.abspath(pd.read_csv(folder / "predictions.csv")["PATH"][0])
    good = json.dumps({"path": path, "classification": "IHC", "reviewer": "", "at": ""}).encode()
    js = {"Content-Type": "application/json"}
    assert request(server, "GET", "/index.html", headers={"Host": f"evil.example:{port}"})[0] == 403
    assert request(server, "POST", "/api/journal", good, {**js, "Origin": "http://evil.example"})[0] == 403
    assert request(server, "POST", "/api/journal", good, {"Content-Type": "text/plain"})[0] == 415
    other = json.dumps({"path": "/etc/passwd", "classification": "IHC", "reviewer": "", "at": ""})
    assert request(server, "POST", "/api/journal", other.encode(), js)[0] == 400
    bad_class = good.replace(b'"IHC"', b'"Fat"')
    assert request(server, "POST", "/api/journal", bad_class, js)[0] == 400
    assert not (folder / "review" / "journal.jsonl").exists()
    assert request(server, "POST", "/api/journal", good, js)[0] == 204
    assert request(server, "GET", "/api/journal")[1].count(b"IHC") == 1
    assert request(server, "GET", "/../predictions.csv")[0] == 404  # nothing outside review/


# ---------------------------------------------------------------------------- --apply


def corrections_csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    pd.DataFrame(rows, columns=["PATH", "CLASSIFICATION"]).to_csv(path, index=False)
    return path


def test_apply_writes_the_reviewed_table_and_sorted_copies_and_twice_changes_nothing(tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c", "d", "e"])
    table = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    paths = dict(zip([Path(p).stem for p in table["PATH"]], table["PATH"]))
    decided_e = table["model_prediction"][4]
    other = next(c for c in CLASSES if c != decided_e)
    csv = corrections_csv(tmp_path / "corrections.csv",
                          [(paths["a"], "IHC"), (paths["b"], "Undecided"), (paths["e"], other)])
    sources = snapshot(tmp_path / "slides")
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    reviewed = pd.read_csv(folder / "reviewed_predictions.csv", keep_default_na=False)
    assert list(reviewed["model_prediction"]) == list(table["model_prediction"])  # kept
    assert list(reviewed["reviewed_class"]) == ["IHC", "Undecided", "Undecided", table["model_prediction"][3], other]
    copies = sorted(p.relative_to(folder / "sorted").as_posix() for p in (folder / "sorted").rglob("*.png"))
    assert len(copies) == 2 and {c.split("__")[0] for c in copies} == {"IHC/a", f"{other}/e"}
    copy_a = next(c for c in copies if c.startswith("IHC/a__"))
    assert (folder / "sorted" / copy_a).read_bytes() == Path(paths["a"]).read_bytes()
    before = snapshot(folder)
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    assert snapshot(folder) == before       # idempotent: nothing rewritten, nothing added
    assert snapshot(tmp_path / "slides") == sources  # the inputs are never touched


def test_apply_refuses_other_corrections_and_unknown_slides_with_one_line(tmp_path, capsys):
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    paths = pd.read_csv(folder / "predictions.csv")["PATH"].tolist()
    first = corrections_csv(tmp_path / "one.csv", [(paths[0], "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(first), "--quiet"]) == 0
    second = corrections_csv(tmp_path / "two.csv", [(paths[0], "TMA")])
    capsys.readouterr()
    assert cli.command(["review", str(folder), "--apply", str(second), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reviewed_predictions.csv: exists" in err
    stranger = tmp_path / "stranger.png"
    Image.new("RGB", (20, 20)).save(stranger)
    third = corrections_csv(tmp_path / "three.csv", [(paths[1], "IHC"), (str(stranger), "TMA")])
    assert cli.command(["review", str(folder), "--apply", str(third), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(r"three\.csv row 3 .*stranger\.png", err)
    fourth = corrections_csv(tmp_path / "four.csv", [(paths[1], "Fat")])
    assert cli.command(["review", str(folder), "--apply", str(fourth), "--quiet"]) == 2
    assert "four.csv row 2 ('Fat')" in capsys.readouterr().err


def test_review_of_a_folder_without_predictions_is_one_line_exit_2(tmp_path, capsys):
    assert cli.command(["review", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no predictions.csv" in err
    assert list(tmp_path.iterdir()) == []   # nothing written


def test_writing_the_page_again_keeps_the_previews_and_touches_nothing_else(tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c"])
    own = {"predictions.csv", "config.yaml", "run.log"}
    run_files = {k: v for k, v in snapshot(folder).items() if k in own}
    inputs = snapshot(tmp_path / "slides")
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    previews = {k: v for k, v in snapshot(folder).items() if k.startswith("review/previews/")}
    assert len(previews) == 6
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    after = snapshot(folder)
    assert {k: v for k, v in after.items() if k.startswith("review/previews/")} == previews
    assert {k: v for k, v in after.items() if k in own} == run_files
    assert set(after) == own | set(previews) | {"review/index.html"}
    assert snapshot(tmp_path / "slides") == inputs and set(tmp_path.iterdir()) == {
        tmp_path / "slides", folder}


def test_review_is_a_subcommand_with_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.command(["--help"])
    assert "\n    review " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.command(["review", "--help"])
    out = capsys.readouterr().out
    assert all(o in out for o in ("--serve", "--port", "--apply", "127.0.0.1"))
    assert cli.command(["review", "x", "--serve", "--apply", "c.csv"]) == 2


def test_review_names_its_page_once_and_says_how_to_serve_it(tmp_path, capsys):
    """Issue 31: the page's line is printed once (it was printed and logged)."""
    from thumbclf.core.logs import remove_handlers

    folder = results_folder(tmp_path, [f"s{i}" for i in range(6)])
    try:
        assert cli.command(["review", str(folder)]) == 0
    finally:
        remove_handlers()
    said = capsys.readouterr()
    console = said.out + said.err
    assert console.count("review page: ") == 1, console
    assert f"serve it with: thumbclf review {folder} --serve" in console


def test_the_python_api_writes_the_page_and_applies_corrections(tmp_path):
    from thumbclf import api

    folder = results_folder(tmp_path, ["a", "b", "c"])
    assert api.review(folder) == folder / "review" / "index.html"
    path = pd.read_csv(folder / "predictions.csv")["PATH"][0]
    csv = corrections_csv(tmp_path / "c.csv", [(path, "TMA")])
    assert api.apply_corrections(folder, csv) == folder / "reviewed_predictions.csv"
    assert pd.read_csv(folder / "reviewed_predictions.csv")["reviewed_class"][0] == "TMA"


def test_a_slides_preview_and_reviewed_copy_are_its_rendered_thumbnail(tmp_path):
    from conftest import make_pyramid

    folder = results_folder(tmp_path, ["a", "b", "c"])
    slide = make_pyramid(tmp_path / "slides" / "slide one.tiff", colour=(40, 160, 60))
    table = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    table.loc[0, "PATH"] = str(slide)
    table.to_csv(folder / "predictions.csv", index=False)
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    large = review_page.preview_files(folder / "review", str(slide))["b"]
    with Image.open(large) as img:
        assert img.size[0] == 800 and abs(img.size[1] - 533) <= 1  # the whole slide, 3:2
        arr = np.asarray(img.convert("RGB"))
    assert tuple(arr[10, 10]) == pytest.approx((0, 0, 255), abs=40)   # its top-left mark
    assert tuple(arr[266, 400]) == pytest.approx((40, 160, 60), abs=40)
    csv = corrections_csv(tmp_path / "c.csv", [(str(slide), "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    copies = list((folder / "sorted" / "IHC").iterdir())
    assert len(copies) == 1 and copies[0].name.startswith("slide one__") and copies[0].suffix == ".png"
    with Image.open(copies[0]) as img:
        assert max(img.size) == 1024            # the run's thumbnail size (slide_thumbnail_size)
    assert not (tmp_path / "thumbclf-cache").exists()  # nothing written outside the folder
