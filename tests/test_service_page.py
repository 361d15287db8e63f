"""The drawing page (GET /) in a real browser: Debian's headless chromium driven by Playwright.

A real server (uvicorn on a free port, in a thread) serves a small snapshot built from the untrained
checkpoint; the tests draw with real pointer events, wait for the results, use undo, redo, clear and
the eraser, upload files, and see errors shown plainly. Screenshots go to $SBIR_TEST_ARTIFACTS
(default tests/artifacts/).

chromium must be installed (`make test` installs it when it can: .ci/ensure-chromium): without it these tests
fail, unless SBIR_SKIP_BROWSER=1 says to skip them. `SBIR_UPDATE_SCREENSHOT=1` also regenerates
docs/img/page.png from the demo index (runs/demo/index, or $SBIR_SCREENSHOT_INDEX).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from test_service_support import new_index_root

from service.server import make_server
from service.settings import Settings
from service.strokes import render_strokes

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("SBIR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
N_PHOTOS = 6
DEFAULT_K = 4
MAX_K = 10
TIMEOUT_MS = 20_000


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("SBIR_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ---- the server ----------------------------------------------------------------------------------


class LiveServer:
    """uvicorn serving the app in a thread of this process, on a free port."""

    def __init__(self, settings: Settings):
        self.server = make_server(settings)
        self.thread = threading.Thread(target=self.server.run, name="sbir-page-server", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        end = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise AssertionError("the server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def serve(root: Path, **extra) -> LiveServer:
    settings = Settings(
        snapshot_root=root,
        port=0,
        device="cpu",
        reload_interval_s=0,
        torch_threads=2,
        faiss_threads=1,
        max_wait_ms=0,
        log_level="warning",
        **extra,
    )
    return LiveServer(settings)


@pytest.fixture(scope="module")
def live(untrained_checkpoint, tmp_path_factory):
    """(base URL, snapshot id) of a running server on N_PHOTOS generated photos."""
    root, snapshot_id = new_index_root(tmp_path_factory.mktemp("page"), untrained_checkpoint, N_PHOTOS)
    with serve(root, default_k=DEFAULT_K, max_k=MAX_K) as url:
        yield url, snapshot_id


# ---- the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if os.environ.get("SBIR_SKIP_BROWSER") == "1":
        pytest.skip("SBIR_SKIP_BROWSER=1: the browser tests are skipped on request")
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"chromium is not installed at {CHROMIUM}: the drawing page's tests need it "
            "(`apt-get install -y --no-install-recommends chromium`, as `make test` does as root; "
            "or set SBIR_SKIP_BROWSER=1 to skip them explicitly)",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[dev]'", pytrace=False)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


class PageProbe:
    """A page plus what it did: /search requests, console errors, uncaught exceptions."""

    def __init__(self, page):
        self.page = page
        self.searches: list = []
        self.errors: list[str] = []
        self.elsewhere: list[str] = []  # requests to any other origin (the page must work offline)
        page.set_default_timeout(TIMEOUT_MS)
        page.on("request", self._request)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda m: m.type == "error" and self.errors.append(f"console: {m.text}"))

    def _request(self, request) -> None:
        if request.method == "POST" and "/search" in request.url:
            self.searches.append(request)


@pytest.fixture
def probe(browser, live, request):
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    p = PageProbe(page)
    context.route(
        lambda u: not u.startswith(live[0]),
        lambda route: p.elsewhere.append(route.request.url) or route.abort(),
    )
    page.goto(live[0] + "/")
    page.wait_for_function(
        "() => document.getElementById('info-serving').textContent.includes('photos indexed')"
    )
    yield p
    page.screenshot(path=str(artifacts_dir() / f"{request.node.name}.png"))
    context.close()
    assert p.elsewhere == []


def draw(page, points, steps: int = 6) -> None:
    """A stroke with real mouse (pointer) events; points in 0..1 of the canvas."""
    box = page.locator("#canvas").bounding_box()

    def xy(p):
        return box["x"] + p[0] * box["width"], box["y"] + p[1] * box["height"]

    page.mouse.move(*xy(points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*xy(p), steps=steps)
    page.mouse.up()


def wait_for_results(page, n: int) -> None:
    """`n` result tiles whose images have loaded (a decoded photo has naturalWidth > 0)."""
    page.wait_for_function(
        """n => {
            const imgs = [...document.querySelectorAll('#grid img')];
            return imgs.length === n && imgs.every(i => i.complete && i.naturalWidth > 0)
                && document.getElementById('grid').getAttribute('aria-busy') === null;
        }""",
        arg=n,
    )


def ink(page) -> int:
    """How many canvas pixels are painted."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
            return n;
        }"""
    )


def canvas_png(page) -> str:
    return page.evaluate("() => document.getElementById('canvas').toDataURL()")


def strokes_sent(request) -> list:
    assert request.headers["content-type"].startswith("application/json")
    return json.loads(request.post_data)["strokes"]


def stroke_count(page) -> int:
    return int(page.get_attribute("#canvas", "data-strokes"))


def status(page) -> str:
    return page.text_content("#status-text")


# ---- tests ---------------------------------------------------------------------------------------


def test_page_and_assets_are_served_from_the_package(live):
    url, _ = live
    with httpx.Client(base_url=url) as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        js, css = c.get("/static/app.js"), c.get("/static/style.css")
        assert js.headers["content-type"].startswith("text/javascript")
        assert css.headers["content-type"].startswith("text/css")
        for module in re.findall(r'from "\./([a-z]+\.js)"', js.text):  # app.js' ES modules, no build step
            assert c.get(f"/static/{module}").headers["content-type"].startswith("text/javascript"), module
        assert c.get("/", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
        assert c.get("/static/../app.py").status_code == 404
        # works offline: every URL the page names is relative (or data:), the code fetches no other origin
        links = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page.text) + re.findall(
            r"url\(([^)]*)\)", css.text
        )
        assert links and all(not re.match(r"['\"]?([a-z]+:)?//", u) for u in links), links
        assert "@import" not in css.text and not re.search(r"https?://", js.text)


def test_draw_search_undo_redo_clear_and_k(probe, live):
    page = probe.page
    assert live[1] in page.text_content("#info-serving")
    assert f"{N_PHOTOS} photos indexed" in page.text_content("#info-serving")
    assert page.is_visible("#hint") and ink(page) == 0

    draw(page, [(0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2, 0.8), (0.2, 0.2)])  # a square
    with page.expect_request(lambda r: "/search" in r.url) as second:
        draw(page, [(0.2, 0.2), (0.8, 0.8)])  # and a diagonal
    assert len(strokes_sent(second.value)) == 2
    wait_for_results(page, DEFAULT_K)
    assert stroke_count(page) == 2 and not page.is_visible("#hint")
    assert "last search" in page.text_content("#info-timing").lower()
    assert page.get_attribute("#grid a", "href").startswith("photos/")
    scores = [float(s) for s in page.locator("#grid .score").all_text_contents()]
    assert scores == sorted(scores, reverse=True)
    # a folder collection stores no metadata: each tile is named by its photo's key (path in the folder)
    names = page.locator("#grid .name").all_text_contents()
    assert len(names) == DEFAULT_K and all(re.fullmatch(r"photo_\d+_\d{3}\.(png|jpg)", n) for n in names), names
    assert page.get_attribute("#grid a", "title").splitlines()[1] == names[0]
    two = canvas_png(page)
    ink_two = ink(page)
    # each finished stroke is searched once the drawing rests (debounced), never mid-stroke
    assert 1 <= len(probe.searches) <= 2

    with page.expect_request(lambda r: "/search" in r.url) as after_undo:
        page.keyboard.press("Control+z")
    assert stroke_count(page) == 1 and len(strokes_sent(after_undo.value)) == 1
    assert 0 < ink(page) < ink_two
    wait_for_results(page, DEFAULT_K)

    with page.expect_request(lambda r: "/search" in r.url) as after_redo:
        page.click("#redo")
    assert stroke_count(page) == 2 and len(strokes_sent(after_redo.value)) == 2
    assert canvas_png(page) == two  # redrawn from the vector model: exactly the same picture
    wait_for_results(page, DEFAULT_K)

    # "Show more" grows k up to what is indexed
    with page.expect_request(lambda r: "/search" in r.url) as more:
        page.click("#more")
    assert "k=8" in more.value.url
    wait_for_results(page, N_PHOTOS)
    assert page.is_hidden("#more")  # every indexed photo is shown
    assert page.input_value("#k") == "8"

    # the drawing survives a reload (localStorage)
    page.reload()
    page.wait_for_function("() => document.getElementById('canvas').dataset.strokes === '2'")
    wait_for_results(page, N_PHOTOS)
    assert canvas_png(page) == two

    page.click("#clear")
    assert stroke_count(page) == 0 and ink(page) == 0
    page.wait_for_function("() => document.querySelectorAll('#grid li').length === 0")
    assert page.is_visible("#empty") and page.is_visible("#hint")
    assert "draw something" in status(page).lower()
    with page.expect_request(lambda r: "/search" in r.url):
        page.keyboard.press("Control+z")  # clear is undoable too
    assert stroke_count(page) == 2 and canvas_png(page) == two
    page.keyboard.press("Delete")
    assert stroke_count(page) == 0
    assert probe.errors == []


def test_eraser_cuts_the_pen_strokes_that_are_sent(probe):
    page = probe.page
    page.keyboard.press("Delete")  # whatever an earlier test left in storage
    draw(page, [(0.1, 0.5), (0.9, 0.5)])
    wait_for_results(page, DEFAULT_K)
    before = ink(page)
    page.keyboard.press("e")
    assert page.get_attribute("#eraser", "aria-pressed") == "true"
    page.keyboard.press("]")  # each tool keeps its own width
    assert page.input_value("#width") == "50" and page.text_content("#width-value") == "50"
    assert page.get_attribute("#width", "aria-label") == "Eraser width"
    with page.expect_request(lambda r: "/search" in r.url) as erased:
        draw(page, [(0.5, 0.3), (0.5, 0.7)])  # across the middle of the line
    sent = strokes_sent(erased.value)
    assert len(sent) == 2, sent  # the line, cut in two; the eraser stroke itself is not sent
    width = float(page.input_value("#width"))
    for xs, ys in sent:
        for x, y in zip(xs, ys, strict=True):
            assert abs(x - 500) > width / 2 - 2 and abs(y - 500) < 3
    assert 0 < ink(page) < before
    assert stroke_count(page) == 2 and "1 eraser" in page.text_content("#stroke-count")
    page.keyboard.press("p")
    assert page.get_attribute("#pen", "aria-pressed") == "true"

    # everything erased: nothing is searched, and the page says why
    page.keyboard.press("Delete")
    page.click("#eraser")
    draw(page, [(0.45, 0.5), (0.55, 0.5)])
    page.wait_for_function("() => document.getElementById('status-text').textContent.includes('erased')")
    page.click("#pen")
    draw(page, [(0.3, 0.3)], steps=1)  # a dot
    wait_for_results(page, DEFAULT_K)
    assert "photos for your drawing (2 strokes)" in status(page)
    page.click("#eraser")
    count = len(probe.searches)
    draw(page, [(0.28, 0.3), (0.32, 0.3)])  # over the dot
    page.wait_for_function("() => document.getElementById('status-text').textContent.includes('erased')")
    assert len(probe.searches) == count
    assert probe.errors == []


def test_upload_and_errors_are_shown_plainly_and_the_drawing_is_kept(probe, tmp_path):
    page = probe.page
    page.keyboard.press("Delete")
    page.keyboard.press("p")
    draw(page, [(0.3, 0.7), (0.5, 0.2), (0.7, 0.7)])
    wait_for_results(page, DEFAULT_K)
    drawn = canvas_png(page)

    sketch = tmp_path / "sketch.png"
    render_strokes([[[10, 120, 240], [200, 20, 200]], [[60, 190], [130, 130]]]).save(sketch)
    with page.expect_request(lambda r: "/search" in r.url) as upload:
        page.set_input_files("#file", str(sketch))
    assert upload.value.headers["content-type"].startswith("multipart/form-data")
    assert b'name="file"' in upload.value.post_data_buffer
    wait_for_results(page, DEFAULT_K)
    assert "sketch.png" in page.text_content("#query")

    # a file dropped on the canvas searches the same way
    with page.expect_request(lambda r: "/search" in r.url) as dropped:
        page.evaluate(
            """async () => {
                const blob = await (await fetch(document.querySelector('#grid img').src)).blob();
                const dt = new DataTransfer();
                dt.items.add(new File([blob], 'dropped.jpg', {type: blob.type}));
                const stage = document.getElementById('stage');
                stage.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
                stage.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
            }"""
        )
    assert b"dropped.jpg" in dropped.value.post_data_buffer
    wait_for_results(page, DEFAULT_K)
    assert "dropped.jpg" in page.text_content("#query")

    # the server refuses a file that is no image: its message is shown, the drawing stays
    page.set_input_files(
        "#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a png"}]
    )
    page.wait_for_selector("#status.error")
    assert "the upload is not an image" in status(page)
    assert "422" in status(page)

    # nothing indexed yet (503 not-ready): said so, and retried
    not_ready = {"error": {"code": "not-ready", "message": "no snapshot has been published yet"}}
    page.route(
        "**/search*",
        lambda route: route.fulfill(status=503, json=not_ready, headers={"Retry-After": "1"}),
    )
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+Shift+z")
    page.wait_for_function(
        "() => document.getElementById('status-text').textContent.includes('Nothing is indexed yet')"
    )
    assert "no snapshot has been published yet" in status(page)
    page.unroute("**/search*")

    # the server unreachable: said so, with a retry button; the drawing is still there
    page.route("**/search*", lambda route: route.abort("connectionrefused"))
    page.keyboard.press("Control+z")
    page.keyboard.press("Control+y")
    page.wait_for_function(
        "() => document.getElementById('status-text').textContent.includes('Cannot reach the server')"
    )
    assert page.is_visible("#retry")
    assert canvas_png(page) == drawn and stroke_count(page) == 1
    page.unroute("**/search*")
    with page.expect_request(lambda r: "/search" in r.url):
        page.click("#retry")
    wait_for_results(page, DEFAULT_K)
    assert page.is_hidden("#retry") and "error" not in page.get_attribute("#status", "class")
    page.wait_for_function(  # the "what am I looking at" line recovers too
        "() => document.getElementById('info-serving').textContent.includes('photos indexed')"
    )
    # the browser logs each failed request (the 422, the 503s, the refused connections); nothing else
    probe.errors = [e for e in probe.errors if "Failed to load resource" not in e]
    assert probe.errors == []


def test_nothing_indexed_yet_is_said_plainly(browser, tmp_path):
    root = tmp_path / "empty-index"  # no CURRENT: the server runs, but has nothing to search
    root.mkdir()
    with serve(root) as url:
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        page.wait_for_function(
            "() => document.getElementById('info-serving').textContent.includes('No snapshot is served yet')"
        )
        assert "has no CURRENT" in page.text_content("#info-serving")  # /info's last_reload_error
        with page.expect_response(lambda r: "/search" in r.url) as answer:
            draw(page, [(0.3, 0.3), (0.7, 0.7)])
        assert answer.value.status == 503
        page.wait_for_selector("#status.error")
        assert status(page).startswith("Nothing is indexed yet: ") and "Retrying in" in status(page)
        assert stroke_count(page) == 1 and ink(page) > 0
        page.screenshot(path=str(artifacts_dir() / "nothing_indexed.png"))
        context.close()


def test_phone_layout_high_dpi_and_resize_keep_the_drawing(browser, live):
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=3, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(live[0] + "/")
    css = page.evaluate(
        "() => { const r = document.getElementById('canvas').getBoundingClientRect(); return [r.width, r.height]; }"
    )
    backing = page.evaluate(
        "() => [document.getElementById('canvas').width, document.getElementById('canvas').height]"
    )
    assert css[0] > 300 and abs(css[0] - css[1]) < 1  # fills the phone's width, square
    assert backing == [round(css[0] * 3), round(css[1] * 3)]
    assert page.evaluate(
        "() => document.documentElement.scrollWidth <= window.innerWidth"
    )  # no sideways scroll
    assert page.evaluate("() => getComputedStyle(document.getElementById('canvas')).touchAction") == "none"

    # a tap with a finger (touch pointer events) at a known place paints that place
    box = page.locator("#canvas").bounding_box()
    with page.expect_request(lambda r: "/search" in r.url) as tapped:
        page.touchscreen.tap(box["x"] + 0.25 * box["width"], box["y"] + 0.75 * box["height"])
    [[xs, ys]] = strokes_sent(tapped.value)  # a dot, where the finger was
    assert len(xs) == 1 and abs(xs[0] - 250) < 3 and abs(ys[0] - 750) < 3
    page.wait_for_function("() => document.getElementById('canvas').dataset.strokes === '1'")
    alpha = page.evaluate(
        """([fx, fy]) => {
            const c = document.getElementById('canvas');
            return c.getContext('2d').getImageData(Math.round(fx * c.width), Math.round(fy * c.height), 1, 1).data[3];
        }""",
        [0.25, 0.75],
    )
    assert alpha > 0
    with page.expect_request(lambda r: "/search" in r.url) as both:
        draw(page, [(0.2, 0.2), (0.8, 0.3)])
    assert len(strokes_sent(both.value)) == 2
    wait_for_results(page, DEFAULT_K)
    page.screenshot(path=str(artifacts_dir() / "phone.png"), full_page=True)

    page.set_viewport_size({"width": 700, "height": 900})  # rotate / resize: strokes are redrawn
    page.wait_for_function(
        "() => document.getElementById('canvas').width === Math.round(document.getElementById('canvas').getBoundingClientRect().width * 3)"
    )
    assert ink(page) > 0 and stroke_count(page) == 2
    context.close()


# ---- the README's screenshot ---------------------------------------------------------------------


def heart() -> list[list[tuple[float, float]]]:
    """One stroke, a heart curve, in 0..1 of the canvas."""
    ts = [i / 60 * 2 * math.pi for i in range(61)]
    return [
        [
            (
                0.5 + 0.02 * 16 * math.sin(t) ** 3,
                0.47
                - 0.02 * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)),
            )
            for t in ts
        ]
    ]


@pytest.mark.skipif(os.environ.get("SBIR_UPDATE_SCREENSHOT") != "1", reason="set SBIR_UPDATE_SCREENSHOT=1")
def test_readme_screenshot(browser):
    """docs/img/page.png: the page on the demo index (make demo builds it) with a heart drawn."""
    root = Path(os.environ.get("SBIR_SCREENSHOT_INDEX") or REPO / "runs" / "demo" / "index")
    assert (root / "CURRENT").is_file(), f"no index at {root}: run `make demo` first"
    with serve(root) as url:
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.goto(url + "/")
        page.wait_for_function(
            "() => document.getElementById('info-serving').textContent.includes('photos indexed')"
        )
        page.keyboard.press("Delete")
        page.select_option("#k", "16")
        for stroke in heart():
            draw(page, stroke, steps=3)
        wait_for_results(page, 16)
        page.mouse.move(5, 5)
        out = REPO / "docs" / "img" / "page.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out))
        shutil.copy(out, artifacts_dir() / "readme.png")
        context.close()


# ---- the page's pure geometry (service/static/geometry.js), imported as a module in the browser -----


@pytest.fixture(scope="module")
def geometry(browser, live):
    """`call(name, *args)`: geometry.js' function `name` applied to JSON arguments, in the browser."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(live[0] + "/static/geometry.js")  # same origin as the module, no page script running

    def call(name: str, *args):
        return page.evaluate(
            "async ([name, args]) => (await import('./geometry.js'))[name](...args)", [name, list(args)]
        )

    yield call
    context.close()


def test_geometry_frame_mapping_clamps_and_rounds(geometry):
    rect = {"left": 100, "top": 50, "width": 400, "height": 400}
    assert geometry("toFrame", 100, 50, rect) == [0, 0]
    assert geometry("toFrame", 500, 450, rect) == [1000, 1000]
    assert geometry("toFrame", 300, 150, rect) == [500, 250]
    assert geometry("toFrame", 0, 999, rect) == [0, 1000]  # outside the canvas: clamped
    assert geometry("toFrame", 100.123, 50, rect) == [0.3, 0]  # 0.3075 frame units, to 0.1


def test_geometry_simplify_keeps_corners_and_drops_collinear_points(geometry):
    line = [[x, 2 * x] for x in range(0, 101, 5)]
    assert geometry("simplify", line, 0.8) == [[0, 0], [100, 200]]
    square = [[0, 0], [50, 0.3], [100, 0], [100, 50], [100, 100], [0, 100], [0, 0]]
    assert geometry("simplify", square, 0.8) == [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    assert geometry("simplify", [[1, 2], [3, 4]], 0.8) == [[1, 2], [3, 4]]


def test_geometry_an_eraser_cuts_a_pen_line_where_it_passed(geometry):
    pen = {"tool": "pen", "width": 12, "points": [[100, 500], [900, 500]]}
    eraser = {"tool": "eraser", "width": 100, "points": [[500, 300], [500, 700]]}  # a vertical swipe
    (left_x, left_y), (right_x, right_y) = geometry("queryStrokes", [pen, eraser])
    assert left_y == [500, 500] and right_y == [500, 500]
    assert left_x[0] == 100 and right_x[-1] == 900
    assert 448 <= left_x[-1] < 450 and 550 < right_x[0] <= 552  # the gap is the eraser's 100 wide disc
    # an eraser drawn before the pen line does not touch it; a clear hides what came before it
    assert geometry("queryStrokes", [eraser, pen]) == [[[100, 900], [500, 500]]]
    actions = [pen, {"clear": True}, eraser]
    assert geometry("strokesAfterLastClear", actions) == [eraser]
    assert geometry("queryStrokes", geometry("strokesAfterLastClear", actions)) == []


def test_geometry_distance_to_a_segment(geometry):
    assert geometry("distToSegment", [5, 5], [0, 0], [10, 0]) == 5
    assert geometry("distToSegment", [13, 4], [0, 0], [10, 0]) == 5  # past the end: to the end point
    assert geometry("distToSegment", [3, 4], [0, 0], [0, 0]) == 5  # a point segment


def test_geometry_only_well_formed_strokes_are_restored(geometry):
    assert geometry("isStroke", {"tool": "pen", "width": 3, "points": [[1, 2]]}) is True
    for bad in (None, {"tool": "brush", "width": 3, "points": [[1, 2]]}, {"tool": "pen", "width": 3, "points": []},
                {"tool": "pen", "width": 3, "points": [[1, "x"]]}, {"tool": "pen", "points": [[1, 2]]}):
        assert geometry("isStroke", bad) is False, bad
