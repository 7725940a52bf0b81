"""thumbclf review: the page in a real browser (Chromium driven by Selenium), the served journal,
and --apply. The results folders are made by the test (a predictions table over a few generated
pictures); no model is needed for the page. The browser tests skip, saying why, where Chromium,
its driver or Selenium is missing (`make test` installs Chromium as root)."""

from __future__ import annotations

import contextlib
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
from thumbclf.outputs import review_page
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


def export(browser, folder: Path) -> Path:
    """Click the page's export button; the corrections.csv the browser downloads to ``folder``."""
    folder.mkdir()
    browser.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow",
                                                            "downloadPath": str(folder)})
    browser.find_element("id", "export").click()
    return wait_for(lambda: (folder / "corrections.csv").is_file() and folder / "corrections.csv")


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
    exported = export(browser, tmp_path / "dl")
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


def test_the_page_exports_a_name_that_is_not_utf8_so_that_apply_finds_it(browser, tmp_path):
    """Issue 33, item 16: the browser wrote the name's odd bytes as U+FFFD into the exported
    corrections.csv, so --apply could never find that slide."""
    folder = results_folder(tmp_path, ["a", "cafX", "c", "d"])
    odd = os.fsdecode(os.fsencode(tmp_path / "slides") + b"/caf\xe9.png")
    os.rename(tmp_path / "slides" / "cafX.png", odd)
    table = folder / "predictions.csv"
    table.write_bytes(table.read_bytes().replace(b"cafX", b"caf\xe9"))
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    open_page(browser, (folder / "review" / "index.html").as_uri())
    browser.find_element("css selector", "#scope option[value='all']").click()
    for _ in range(4):  # to the slide with the odd name, whatever the queue's order
        if current(browser).startswith("caf"):
            break
        press(browser, "j")
    assert current(browser).startswith("caf")
    press(browser, "2")
    exported = export(browser, tmp_path / "dl")
    assert "\\xe9" in exported.read_text(encoding="utf-8")
    assert [str(c.path) for c in read_table_of(exported)] == [odd]
    assert cli.command(["review", str(folder), "--apply", str(exported), "--quiet"]) == 0


def test_the_page_filters_by_source_and_by_every_reason_present(browser, tmp_path):
    """Issue 28: the review page can filter by source (the inputs' SOURCE column), and its
    reasons are the ones the slides have ('no tissue' was missing from a fixed list)."""
    folder = results_folder(tmp_path, [f"s{i}" for i in range(8)])
    table = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    table["SOURCE"] = ["lab A", "__proto__", "lab A", "", "lab A", "__proto__", "lab A", "lab A"]
    table.loc[1, "undecided_reason"] = "no tissue"
    table.to_csv(folder / "predictions.csv", index=False)
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    open_page(browser, (folder / "review" / "index.html").as_uri())
    choices = lambda box: browser.execute_script(  # noqa: E731
        f"return [...document.querySelectorAll('#{box} option')].map(o => o.value)")
    assert choices("fsource") == ["", "__proto__", "lab A"]
    assert choices("freason") == ["", "disagreement", "low confidence", "no tissue", "unfamiliar"]
    assert browser.find_element("id", "fsourcebox").is_displayed()
    browser.find_element("id", "scope").send_keys("everything")
    browser.find_element("css selector", "#fsource option[value='__proto__']").click()
    shown = lambda: browser.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('.card .name')].map(e => e.textContent).sort()")
    wait_for(lambda: shown() == ["s1.png", "s5.png"])
    assert "source: __proto__" in browser.find_element("css selector", ".card").text
    browser.find_element("css selector", "#freason option[value='no tissue']").click()
    wait_for(lambda: shown() == ["s1.png"])


def test_a_page_without_sources_has_no_source_filter(browser, tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    open_page(browser, (folder / "review" / "index.html").as_uri())
    assert not browser.find_element("id", "fsourcebox").is_displayed()


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


@contextlib.contextmanager
def serving(folder):
    """The review server of ``folder`` on 127.0.0.1, in a thread, until the block ends."""
    box: dict = {}
    ready = threading.Event()

    def on_ready(server):
        box["server"] = server
        ready.set()

    thread = threading.Thread(target=review_flow.serve, args=(folder, 0),
                              kwargs={"ready": on_ready}, daemon=True)
    thread.start()
    assert ready.wait(60)
    try:
        yield box["server"]
    finally:
        box["server"].shutdown()
        thread.join(10)


@pytest.fixture
def served(tmp_path):
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    with serving(folder) as server:
        yield folder, server
    assert not (folder / layout.LOCK).exists()  # the folder's lock is released


def request(server, method: str, path: str, body: bytes | None = None, headers=None, *,
            token: bool = True):
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    sent = {"Host": f"127.0.0.1:{port}", **({"X-Thumbclf-Token": server.token} if token else {})}
    conn.request(method, path, body=body, headers={**sent, **(headers or {})})
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


def test_corrections_the_server_refused_survive_a_reload_and_are_sent_again(browser, served):
    """Issue 33, item 3: corrections the page kept in the browser (server down, or a POST
    refused) were discarded by a reload once the server was back."""
    folder, server = served
    open_page(browser, server.url)
    first = current(browser)
    check = server.check_entry
    server.check_entry = lambda entry: "the disk is full"  # every POST refused for now
    press(browser, "3")
    wait_for(lambda: browser.find_element("id", "warning").is_displayed())
    assert "kept in this browser" in browser.find_element("id", "warning").text
    journal = folder / "review" / "journal.jsonl"
    assert not journal.exists()
    server.check_entry = check  # the server takes entries again
    browser.refresh()
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1")
    assert card_review(browser, first) == "reviewed: TMA"
    wait_for(lambda: journal.is_file() and journal.read_text().count("\n") == 1)
    assert json.loads(journal.read_text())["classification"] == "TMA"
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready") == "1")
    assert card_review(browser, first) == "reviewed: TMA"


def test_server_refuses_other_hosts_origins_and_entries(served):
    folder, server = served
    port = server.server_address[1]
    path = os.path.abspath(pd.read_csv(folder / "predictions.csv")["PATH"][0])
    good = json.dumps({"path": path, "classification": "IHC", "reviewer": "", "at": "",
                       "seq": 1}).encode()
    js = {"Content-Type": "application/json"}
    assert request(server, "GET", "/index.html", headers={"Host": f"evil.example:{port}"})[0] == 403
    assert request(server, "POST", "/api/journal", good, {**js, "Origin": "http://evil.example"})[0] == 403
    assert request(server, "POST", "/api/journal", good, {"Content-Type": "text/plain"})[0] == 415
    other = json.dumps({"path": "/etc/passwd", "classification": "IHC", "reviewer": "", "at": "",
                        "seq": 1})
    assert request(server, "POST", "/api/journal", other.encode(), js)[0] == 400
    bad_class = good.replace(b'"IHC"', b'"Fat"')
    assert request(server, "POST", "/api/journal", bad_class, js)[0] == 400
    assert not (folder / "review" / "journal.jsonl").exists()
    assert request(server, "POST", "/api/journal", good, js)[0] == 204
    assert request(server, "GET", "/api/journal")[1].count(b"IHC") == 1
    assert request(server, "GET", "/../predictions.csv")[0] == 404  # nothing outside review/


def entry_body(folder: Path, i: int, cls: str | None, seq: int) -> bytes:
    path = os.path.abspath(pd.read_csv(folder / "predictions.csv")["PATH"][i])
    return json.dumps({"path": path, "classification": cls, "reviewer": "", "at": "",
                       "seq": seq}).encode()


JS = {"Content-Type": "application/json"}


def test_server_refuses_everything_without_its_token_and_refuses_framing(served):
    """Issue 33, item 9: a per-run secret token, printed by --serve, guards every request
    (local programs without Origin included); no page may frame the review page."""
    folder, server = served
    assert f"token={server.token}" in server.url and len(server.token) >= 32
    for method, path, body in (("GET", "/index.html", None), ("GET", "/api/journal", None),
                               ("POST", "/api/journal", entry_body(folder, 0, "IHC", 1)),
                               ("POST", "/api/export", b"")):
        assert request(server, method, path, body, JS, token=False)[0] == 403, path
        bad = {**JS, "X-Thumbclf-Token": "x" * len(server.token)}
        assert request(server, method, path, body, bad, token=False)[0] == 403, path
    assert not (folder / "review" / "journal.jsonl").exists()
    host, port = server.server_address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", f"/index.html?token={server.token}", headers={"Host": f"127.0.0.1:{port}"})
    r = conn.getresponse()
    r.read()
    assert r.status == 200
    assert "frame-ancestors 'none'" in r.getheader("Content-Security-Policy")
    assert r.getheader("X-Frame-Options") == "DENY"
    cookie = r.getheader("Set-Cookie")  # the page's pictures are fetched with it
    assert server.token in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    name = cookie.split("=")[0]
    assert request(server, "GET", "/api/journal", headers={"Cookie": f"{name}={server.token}"},
                   token=False)[0] == 200
    conn = http.client.HTTPConnection(host, port, timeout=10)  # the bare address works too
    conn.request("GET", f"/?token={server.token}", headers={"Host": f"127.0.0.1:{port}"})
    r = conn.getresponse()
    assert r.status == 200 and b"thumbclf-data" in r.read() and r.getheader("Set-Cookie")


def raw(server, data: bytes, *, wait: float = 15.0) -> bytes:
    import socket

    s = socket.create_connection(server.server_address, timeout=wait)
    s.sendall(data)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    s.close()
    return out


def test_bad_lengths_deep_nesting_and_hang_ups_are_refused_without_traceback(served, capfd):
    """Issue 33, item 12: Content-Length negative, longer than the body, too large; 50,000
    nested levels; a client that hangs up: a 4xx reply or a closed connection within the read
    timeout, never a traceback, and the server goes on serving."""
    from thumbclf.workflows import review_server

    folder, server = served
    port = server.server_address[1]
    head = (f"POST /api/journal HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Thumbclf-Token: "
            f"{server.token}\r\nContent-Type: application/json\r\n").encode()
    assert raw(server, head + b"Content-Length: -1\r\n\r\n{}").startswith(b"HTTP/1.0 400")
    assert raw(server, head + b"Content-Length: 10**9\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw(server, head + b"Content-Length: 900000\r\n\r\n").startswith(b"HTTP/1.0 413")
    started = time.monotonic()
    assert raw(server, head + b"Content-Length: 50\r\n\r\n{}").startswith(b"HTTP/1.0 400")
    assert time.monotonic() - started < review_server.READ_TIMEOUT_S + 5
    deep = b"[" * 50_000 + b"]" * 50_000
    assert request(server, "POST", "/api/journal", deep, JS)[0] == 400
    import socket

    s = socket.create_connection(server.server_address, timeout=5)
    s.sendall(head + b"Content-Length: 100\r\n\r\n{")
    s.close()  # hangs up mid-body
    assert request(server, "POST", "/api/journal", entry_body(folder, 0, "IHC", 5), JS)[0] == 204
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception" not in err


def test_entries_land_in_sequence_order_whatever_order_they_arrive_in(served):
    """Issue 33, item 5: concurrent POSTs arrive out of order; the journal's last word on a
    slide is its entry with the highest sequence number, as on the page."""
    folder, server = served
    order = [(3, "TMA"), (1, "Biopsy"), (4, None), (2, "IHC"), (6, "Biopsy"), (5, "TMA")]
    threads = [threading.Thread(target=request, args=(server, "POST", "/api/journal",
                                                      entry_body(folder, 1, cls, seq), JS))
               for seq, cls in order]
    for t in threads:
        t.start()
        t.join()  # arrival order: the list's, not the sequence's
    assert request(server, "POST", "/api/export", b"")[0] == 200
    exported = read_table_of(folder / "review" / "corrections.csv")
    assert [c.label for c in exported] == ["Biopsy"]  # seq 6, though 5 arrived last
    entries = json.loads(request(server, "GET", "/api/journal")[1])
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]


def test_the_journal_is_never_cut_and_odd_lines_are_kept_or_skipped(tmp_path):
    """Issue 33, item 4: --serve truncated a torn tail over 1 MiB to 0 bytes, cut a valid last
    line without newline, dropped entries holding U+2028/U+2029/U+0085, and a null line
    stopped the export with a traceback."""
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    paths = [os.path.abspath(p) for p in pd.read_csv(folder / "predictions.csv")["PATH"]]
    journal = folder / "review" / "journal.jsonl"
    journal.parent.mkdir()
    lines = [json.dumps({"path": paths[0], "classification": "IHC", "reviewer": "A\u2028B\u2029C\u0085",
                         "at": "", "seq": 1}, ensure_ascii=False), "null", "[1, 2]", "{\"path\": 5}"]
    torn = "{" + "x" * (2 << 20)  # a torn tail of 2 MiB, then a valid last line without newline
    last = json.dumps({"path": paths[1], "classification": "TMA", "reviewer": "", "at": "", "seq": 2})
    journal.write_bytes(("\n".join(lines) + "\n" + torn + "\n" + last).encode())
    before = journal.read_bytes()
    with serving(folder) as server:
        assert journal.read_bytes() == before  # nothing cut at start
        entries = json.loads(request(server, "GET", "/api/journal")[1])
        assert [(e["path"], e["classification"]) for e in entries] == [(paths[0], "IHC"), (paths[1], "TMA")]
        assert entries[0]["reviewer"] == "A\u2028B\u2029C\u0085"
        assert request(server, "POST", "/api/journal", entry_body(folder, 2, "Biopsy", 3), JS)[0] == 204
        assert journal.read_bytes().startswith(before + b"\n")  # appended on its own line
        assert request(server, "POST", "/api/export", b"")[0] == 200
        exported = read_table_of(folder / "review" / "corrections.csv")
        assert [(str(c.path), c.label) for c in exported] == [
            (paths[0], "IHC"), (paths[1], "TMA"), (paths[2], "Biopsy")]


def test_links_inside_the_results_folder_are_never_written_through_nor_served(tmp_path):
    """Issue 33, item 10: a journal linked to a file outside got JSON appended (and its last
    line cut); a linked review/ folder got the page written into it and its files served."""
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    outside = tmp_path / "precious.txt"
    outside.write_text("line one\nno newline")
    (folder / "review").mkdir()
    (folder / "review" / "journal.jsonl").symlink_to(outside)
    with serving(folder) as server:
        (folder / "review" / "secret.txt").symlink_to(outside)
        assert request(server, "GET", "/secret.txt")[0] == 404
        assert request(server, "POST", "/api/journal", entry_body(folder, 0, "IHC", 1), JS)[0] == 500
    assert outside.read_text() == "line one\nno newline"
    other = results_folder(tmp_path / "2", ["a", "b", "c", "d"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (other / "review").symlink_to(elsewhere, target_is_directory=True)
    assert cli.command(["review", str(other), "--quiet"]) == 2
    assert list(elsewhere.iterdir()) == []


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


def dicom_with_label(folder: Path, tmp_path: Path) -> Path:
    """A DICOM WSI folder (wsidicomizer, from a generated pyramid) plus a LABEL instance named
    so that it is the folder's first .dcm in sort order."""
    import tifffile

    pydicom = pytest.importorskip("pydicom")
    wsidicomizer = pytest.importorskip("wsidicomizer")
    tiff = tmp_path / "src.tiff"
    img = np.full((800, 1200, 3), 240, np.uint8)
    img[200:600, 300:900] = (40, 160, 60)
    with tifffile.TiffWriter(tiff) as tw:
        for k in (1, 2, 4):
            tw.write(img[::k, ::k].copy(), tile=(256, 256), photometric="rgb", compression="jpeg",
                     resolution=(2e4 / k, 2e4 / k), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 1 else 1)
    folder.mkdir(parents=True)
    wsidicomizer.WsiDicomizer.convert(tiff, folder, tile_size=256, workers=1,
                                      include_label=False, include_overview=False)
    ds = pydicom.dcmread(min(folder.glob("*.dcm"), key=lambda p: p.stat().st_size))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
    ds.PatientName, ds.SOPInstanceUID = "DOE^JANE", pydicom.uid.generate_uid()
    ds.save_as(folder / "0-label.dcm")
    return folder / "0-label.dcm"


def test_apply_copies_a_dicom_slide_as_the_deploy_does_never_its_label(tmp_path):
    """Issue 33, item 1: a table naming a DICOM slide by its first .dcm (a LABEL instance with
    the patient's name) made --apply with sortSlides copy that file, not the slide."""
    folder = results_folder(tmp_path, ["a", "b", "c"])
    label = dicom_with_label(tmp_path / "slides" / "slide1", tmp_path)
    table = pd.read_csv(folder / "predictions.csv", keep_default_na=False)
    table.loc[0, "PATH"] = str(label)
    table.to_csv(folder / "predictions.csv", index=False)
    (folder / "config.yaml").write_text("thumb_data: slides\nsort_thumbs: true\nsort_slides: true\n")
    csv = corrections_csv(tmp_path / "c.csv", [(str(label), "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    copied = sorted(p.relative_to(folder / "sorted").as_posix()
                    for p in (folder / "sorted").rglob("*") if p.is_file())
    series = sorted(p.name for p in label.parent.glob("*.dcm") if p != label)
    assert [c.rsplit("/", 1)[-1] for c in copied if c.endswith(".dcm")] == series
    assert all(c.startswith("IHC/") for c in copied) and any(c.endswith(".png") for c in copied)
    secret = label.read_bytes()
    assert not any(p.read_bytes() == secret for p in (folder / "sorted").rglob("*.dcm"))
    from thumbclf.outputs import sorting  # the deploy's sorting: the same copy path

    jobs = sorting.plan_copies([(label, "IHC", tmp_path / "src.tiff")], tmp_path / "dep",
                               with_slides=True)
    sorting.copy_all(jobs)
    assert sorted(p.name for p in (tmp_path / "dep").rglob("*.dcm")) == series


def test_a_second_apply_leaves_no_stale_copy_in_another_class_folder(tmp_path, capsys):
    """Issue 33, item 6: moving reviewed_predictions.csv away (as the message says) and
    applying other corrections left each corrected slide in two class folders of sorted/."""
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    paths = pd.read_csv(folder / "predictions.csv")["PATH"].tolist()
    decided = pd.read_csv(folder / "predictions.csv")["model_prediction"].tolist()
    one = [c for c in CLASSES if c != decided[3]]
    first = corrections_csv(tmp_path / "one.csv", [(paths[3], one[0]), (paths[0], "IHC")])
    assert cli.command(["review", str(folder), "--apply", str(first), "--quiet"]) == 0
    (folder / "reviewed_predictions.csv").rename(tmp_path / "old_reviewed.csv")
    (folder / "sorted" / "TMA").mkdir(parents=True, exist_ok=True)
    (folder / "sorted" / "TMA" / "mine.txt").write_text("not made by --apply")  # kept
    second = corrections_csv(tmp_path / "two.csv", [(paths[3], one[1])])
    assert cli.command(["review", str(folder), "--apply", str(second), "--quiet"]) == 0
    copies = sorted(p.relative_to(folder / "sorted").as_posix()
                    for p in (folder / "sorted").rglob("*.png"))
    assert [c.split("__")[0] for c in copies] == [f"{one[1]}/d"]
    assert (folder / "sorted" / "TMA" / "mine.txt").is_file()


def test_a_port_out_of_range_and_a_killed_copys_leftovers_are_handled(tmp_path, capsys):
    """Issue 33, item 20: --port 70000 gave exit 1 (a traceback); a killed --apply left hidden
    partial copies in sorted/."""
    folder = results_folder(tmp_path, ["a", "b", "c", "d"])
    assert cli.command(["review", str(folder), "--serve", "--port", "70000", "--quiet"]) == 2
    assert "choose another --port (1 to 65535)" in capsys.readouterr().err
    paths = pd.read_csv(folder / "predictions.csv")["PATH"].tolist()
    csv = corrections_csv(tmp_path / "c.csv", [(paths[0], "IHC")])
    jobs = review_flow.reviewed_copies(folder, review_flow.reviewed_table(
        *read_predictions(folder), read_corrections_of(csv)), review_flow.settings(folder))
    left = jobs[0][1].with_name(f".{jobs[0][1].name}.k1ll3d.tmp")
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a copy")
    assert cli.command(["review", str(folder), "--apply", str(csv), "--quiet"]) == 0
    assert not left.exists() and jobs[0][1].is_file()


def read_predictions(folder: Path):
    from thumbclf.core import table as table_io

    return table_io.read(folder / "predictions.csv")


def read_corrections_of(csv: Path):
    from thumbclf.inputs.corrections import read_corrections

    return read_corrections([csv])


def test_review_and_apply_take_a_name_that_is_not_utf8(tmp_path):
    """Issue 33, item 16: review, --serve and --apply exited 1 on a folder holding a file name
    that is not UTF-8 (pandas' astype(str) refused its surrogate escapes)."""
    folder = results_folder(tmp_path, ["a", "cafX", "c", "d"])
    os.rename(tmp_path / "slides" / "cafX.png",
              os.fsdecode(os.fsencode(tmp_path / "slides") + b"/caf\xe9.png"))
    table = folder / "predictions.csv"
    table.write_bytes(table.read_bytes().replace(b"cafX", b"caf\xe9"))
    assert cli.command(["review", str(folder), "--quiet"]) == 0
    path = next(line for line in table.read_bytes().split(b"\n") if b"caf" in line).split(b",")[0]
    (tmp_path / "c.csv").write_bytes(b"PATH,CLASSIFICATION\n" + path + b",IHC\n")
    assert cli.command(["review", str(folder), "--apply", str(tmp_path / "c.csv"), "--quiet"]) == 0
    assert len(list((folder / "sorted" / "IHC").glob("caf*.png"))) == 1
