"""The web page at /ui, in a real headless Chromium (Debian's, driven by Playwright) against
the real `bentoml serve` with the demo model: what a user clicks, what the server answers,
the video file the Download link gives."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from bentosvd.media.video import probe_video
from tests.conftest import make_image
from tests.test_service import LONG

GENERATION_MS = 90_000  # a demo generation takes ~3 s on a CPU; a slow shared CI machine more


def _unavailable(reason: str):
    # CI must run these tests; a developer without the browser gets a skip that says why.
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """The system Chromium's path; checked first (autouse), before the server starts."""
    if importlib.util.find_spec("playwright") is None:
        _unavailable("playwright is not installed: pip install -r requirements-dev.txt")
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        _unavailable("chromium is not installed: bash scripts/install_browser.sh")
    return path


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    # Playwright's own browser download is unreachable here; the system Chromium is driven instead.
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium)
        yield browser
        browser.close()


def js_number(x: float) -> str:
    """`x` as JavaScript writes it (1.0 → "1")."""
    return str(int(x)) if x == int(x) else repr(x)


@pytest.fixture(scope="module")
def info(server) -> dict:
    response = httpx.get(f"{server.url}/info", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


class UI:
    """The page, with every request it made and every script error it hit."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.requests: list[str] = []
        self.responses: list[str] = []  # "STATUS METHOD URL", for failure messages
        self.script_errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("response", lambda r: self.responses.append(f"{r.status} {r.request.method} {r.url}"))
        page.on("pageerror", lambda e: self.script_errors.append(str(e)))

    def open(self, path: str = "/ui/", advanced: bool = True) -> None:
        """Load the page; with `advanced`, open the Advanced params too (most tests use them)."""
        self.page.goto(f"{self.server.url}{path}")
        self.page.wait_for_selector("#param-seed")  # the form is built from /info
        if advanced:
            self.page.click("#advanced summary")
        # Every text #status shows, in order, however briefly.
        self.page.evaluate("""() => {
            window.statusLog = [];
            new MutationObserver(() => window.statusLog.push(
                document.getElementById('status').dataset.status + ': ' +
                document.getElementById('status').textContent))
              .observe(document.getElementById('status'), {childList: true, subtree: true, attributes: true});
        }""")

    def choose(self, path: Path) -> None:
        """Pick `path` with the file picker; return once its preview is drawn."""
        self.page.set_input_files("#file", str(path))
        self.wait_caption(path.name)

    def wait_caption(self, text: str) -> None:
        self.page.wait_for_function(
            "text => document.getElementById('preview-caption').textContent.includes(text)", arg=text)

    def canvas_size(self) -> tuple[int, int]:
        return tuple(self.page.eval_on_selector("#preview", "c => [c.width, c.height]"))

    def pixel(self, x: int, y: int) -> list[int]:
        return self.page.eval_on_selector(
            "#preview", f"c => Array.from(c.getContext('2d').getImageData({x}, {y}, 1, 1).data)")

    def wait_status(self, status: str, timeout: float = GENERATION_MS) -> None:
        """Wait for the job to end (or for `status`); fail with what the page and the server
        saw if it ends otherwise or not in time."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        ends = {status, "succeeded", "failed", "cancelled"}
        selector = ", ".join(f"#status[data-status={s}]" for s in sorted(ends))
        try:
            self.page.wait_for_selector(selector, timeout=timeout)
            shown = self.page.get_attribute("#status", "data-status")
        except PlaywrightTimeout:
            shown = f"none of {sorted(ends)} within {timeout / 1000:.0f} s"
        if shown != status:
            raise AssertionError(
                f"waited for status {status!r}, got {shown}\n"
                f"page status log: {self.page.evaluate('window.statusLog || []')}\n"
                f"page error: {self.page.text_content('#error')!r}\n"
                f"last responses: {self.responses[-12:]}\n"
                f"server log (end):\n{self.server.log_text()}")

    def off_host(self) -> list[str]:
        host = urlsplit(self.server.url).netloc
        return [u for u in self.requests
                if not u.startswith(("data:", "blob:")) and urlsplit(u).netloc != host]


@pytest.fixture
def ui(browser, server):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    ui = UI(page, server)
    yield ui
    context.close()
    assert not ui.script_errors, ui.script_errors


def test_page_shows_the_model_its_warning_and_the_bounds_from_info(ui, info):
    ui.open("/ui")  # without the slash: redirected to /ui/, so relative links resolve
    assert urlsplit(ui.page.url).path == "/ui/"
    if info["warning"]:
        assert ui.page.is_visible("#warning")
        assert info["warning"] in ui.page.inner_text("#warning")
    else:
        assert ui.page.is_hidden("#warning")

    for name, schema in info["params"].items():
        # pydantic writes an optional field as anyOf [{...}, {"type": "null"}]
        prop = {**next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), {}), **schema}
        field = ui.page.locator(f"#param-{name}")
        row_text = ui.page.locator(".param", has=field).inner_text()
        if "enum" in prop:
            options = field.locator("option").all_inner_texts()
            assert options == prop["enum"], name
            assert field.input_value() == prop["default"], name
        elif prop.get("type") == "boolean":
            assert field.is_checked() == bool(prop.get("default")), name
        elif "minimum" in prop and "maximum" in prop:
            low, high = js_number(prop["minimum"]), js_number(prop["maximum"])
            assert (field.get_attribute("min"), field.get_attribute("max")) == (low, high), name
            assert f"{low} to {high}" in row_text, name
            expected = "" if prop.get("default") is None else js_number(prop["default"])
            assert field.input_value() == expected, name
        if prop.get("description"):
            assert prop["description"] in row_text, name
    # seed's default is null: "randomize" is on, and no seed is sent
    assert ui.page.is_checked("#randomize")
    assert ui.page.is_disabled("#param-seed")
    assert ui.page.is_disabled("#submit")  # until an image is chosen
    assert not ui.off_host(), ui.off_host()


def test_preview_is_the_image_as_the_model_sees_it(ui, info, tmp_path):
    width, height = info["width"], info["height"]
    ui.open()
    ui.choose(make_image(tmp_path / "portrait.png", size=(600, 900)))
    assert ui.canvas_size() == (height, width)  # portrait: swapped, 144×256 for the demo
    corner = ui.pixel(height // 2, 2)  # "crop" covers the canvas: image at the top edge
    assert corner[:3] != [0, 0, 0], corner

    # "pad" fits 600×900 inside 144×256: 144×216 with black bars of 20 px above and below
    ui.page.select_option("#param-sizing", "pad")
    ui.wait_caption("(pad)")
    assert ui.canvas_size() == (height, width)
    assert ui.pixel(height // 2, 2) == [0, 0, 0, 255]
    assert ui.pixel(height // 2, width // 2)[:3] != [0, 0, 0]

    ui.choose(make_image(tmp_path / "landscape.png", size=(800, 600)))
    assert ui.canvas_size() == (width, height)
    ui.choose(make_image(tmp_path / "square.png", size=(500, 500)))
    assert ui.canvas_size() == (width, height)  # square counts as landscape
    assert ui.page.is_enabled("#submit")


def test_drop_an_image(ui, info, tmp_path):
    ui.open()
    data = make_image(tmp_path / "dropped.png", size=(300, 700)).read_bytes()
    ui.page.evaluate("""b64 => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'dropped.png', {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
    }""", base64.b64encode(data).decode())
    ui.wait_caption("dropped.png")
    assert ui.canvas_size() == (info["height"], info["width"])


def test_generate_plays_the_video_and_downloads_a_valid_mp4(ui, info, tmp_path):
    seed = 1234567890123  # above 2^32: checks the seed survives as a JavaScript number
    ui.open()
    ui.choose(make_image(tmp_path / "portrait.png", size=(600, 900)))
    ui.page.uncheck("#randomize")
    ui.page.fill("#param-seed", str(seed))
    ui.page.click("#submit")
    assert ui.page.is_enabled("#cancel")
    ui.wait_status("succeeded")

    log = ui.page.evaluate("window.statusLog")
    assert any(line.startswith("running:") for line in log), log
    for line in log:
        if line.startswith("running: Step "):
            assert line.endswith(f" of {info['num_inference_steps']}"), line
    assert ui.page.eval_on_selector("#progress", "p => p.value === p.max")

    ui.page.wait_for_function(
        "() => { const v = document.querySelector('#player video'); return v && v.readyState >= 1 }")
    duration, video_width, video_height = ui.page.eval_on_selector(
        "#player video", "v => [v.duration, v.videoWidth, v.videoHeight]")
    assert duration > 0
    assert (video_width, video_height) == (info["height"], info["width"])
    assert ui.page.inner_text("#seed") == f"Seed used: {seed}"

    with ui.page.expect_download() as download:
        ui.page.click("#download")
    assert download.value.suggested_filename == f"portrait-{info['model']}-seed{seed}.mp4"
    video = probe_video(Path(download.value.path()).read_bytes())
    assert video["codec"] == "h264"
    assert video["frames"] == info["num_frames"]
    assert (video["width"], video["height"]) == (info["height"], info["width"])
    assert video["fps"] == 6 + 1  # fps_id's default
    assert ui.page.is_enabled("#submit") and ui.page.is_disabled("#cancel")
    assert not ui.off_host(), ui.off_host()


def test_gif_plays_in_an_img_smoothed_as_the_page_says(ui, info, tmp_path):
    ui.open()
    ui.choose(make_image(tmp_path / "photo.png", size=(800, 600)))
    ui.page.select_option("#param-format", "gif")
    ui.page.fill("#param-interpolate_fps", "14")
    ui.page.click("#submit")
    ui.wait_status("succeeded")
    ui.page.wait_for_function(
        "() => { const i = document.querySelector('#player img'); return i && i.complete && i.naturalWidth }")
    size = ui.page.eval_on_selector("#player img", "i => [i.naturalWidth, i.naturalHeight]")
    assert size == [info["width"], info["height"]]
    # randomize was on: the seed the server picked is shown, and put in the seed field
    shown = int(ui.page.get_attribute("#seed", "data-seed"))
    assert ui.page.input_value("#param-seed") == str(shown)
    assert ui.page.get_attribute("#download", "download") == f"photo-{info['model']}-seed{shown}.gif"
    # The demo's RIFE is the default interpolation, and the page says what was done.
    assert ui.page.inner_text("#seed") == f"Seed used: {shown}, smoothed: rife 7->14 fps"


def test_server_errors_are_shown_with_their_fix(ui, server, tmp_path):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image")
    expected = httpx.post(f"{server.url}/jobs", files={"img": ("garbage.png", b"this is not an image",
                                                                "image/png")},
                          data={"params": "{}"}, timeout=30)
    assert expected.status_code == 400, expected.text
    body = expected.json()

    ui.open()
    ui.choose(garbage)
    assert "cannot show it" in ui.page.inner_text("#preview-caption")
    ui.page.click("#submit")
    ui.page.wait_for_selector("#error:not([hidden])")
    assert ui.page.inner_text("#error-message") == body["message"]
    if body.get("fix"):
        assert ui.page.inner_text("#error-fix") == f"Fix: {body['fix']}"
    assert ui.page.get_attribute("#status", "data-status") == "failed"
    assert ui.page.is_enabled("#submit")  # the user can pick another image and retry


def test_cancel_a_job(ui, server, tmp_path):
    ui.open()
    ui.choose(make_image(tmp_path / "photo.png", size=(800, 600)))
    with ui.page.expect_response(lambda r: r.url.endswith("/jobs") and r.request.method == "POST") as created:
        ui.page.click("#submit")
        ui.page.click("#cancel")  # at once: the upload may still be on its way
    job_id = created.value.json()["id"]
    ui.wait_status("cancelled")
    assert ui.page.is_hidden("#result")
    assert ui.page.is_enabled("#submit") and ui.page.is_disabled("#cancel")

    state = httpx.get(f"{server.url}/jobs/{job_id}", timeout=30).json()
    assert state["status"] == "cancelled", json.dumps(state)
    assert httpx.get(f"{server.url}/jobs/{job_id}/result", timeout=30).status_code >= 400


def test_a_second_job_shows_its_place_in_the_queue(browser, server, ui, tmp_path):
    first = ui
    second = UI(browser.new_page(), server)
    for page in (first, second):
        page.open()
        page.choose(make_image(tmp_path / "photo.png", size=(800, 600)))
    first.page.fill("#param-num_inference_steps", str(LONG["num_inference_steps"]))
    with first.page.expect_response(lambda r: r.url.endswith("/jobs")):
        first.page.click("#submit")
    second.page.click("#submit")  # while the worker is busy with the first
    second.wait_status("succeeded")
    first.wait_status("succeeded")
    log = second.page.evaluate("window.statusLog")
    assert any(line.startswith("queued: Queued") for line in log), log
    second.page.close()
    assert not second.script_errors, second.script_errors


def test_the_session_strip_keeps_each_video_with_its_seed_and_gives_its_settings_back(ui, info, tmp_path):
    """Two videos in one session (the fewest frames and steps the page allows): both in the
    strip, newest first, each with its seed; "use these settings again" on the first puts
    its seed back in the form."""
    page = ui.page
    ui.open()
    ui.choose(make_image(tmp_path / "photo.png", size=(800, 600)))
    low = {name: js_number(flatten(info["params"][name])["minimum"])
           for name in ("num_frames", "num_inference_steps")}
    for name, value in low.items():
        page.fill(f"#param-{name}", value)
    page.uncheck("#randomize")
    for count, seed in enumerate(["11", "22"], start=1):
        page.fill("#param-seed", seed)
        page.click("#submit")  # waits until it is enabled again after the first video
        page.wait_for_function("n => document.querySelectorAll('#history-list li').length === n",
                               arg=count, timeout=GENERATION_MS)
        ui.wait_status("succeeded")
        assert page.get_attribute("#player video", "aria-label") == f"Generated video, seed {seed}"

    items = page.locator("#history-list li")
    assert items.count() == 2
    assert [items.nth(i).get_attribute("data-seed") for i in range(2)] == ["22", "11"]
    for i, seed in enumerate(["22", "11"]):
        caption = items.nth(i).locator("p").inner_text()
        assert f"seed {seed}" in caption and f"num_frames {low['num_frames']}" in caption, caption
        assert items.nth(i).locator("video").get_attribute("aria-label") == f"Generated video, seed {seed}"

    first = page.locator("#history-list li[data-seed='11']")
    page.check("#randomize")
    page.fill("#param-num_frames", str(info["num_frames"]))
    first.get_by_role("button", name="Use these settings again (seed 11)").click()
    assert page.input_value("#param-seed") == "11" and not page.is_checked("#randomize")
    assert page.is_enabled("#param-seed")
    assert page.input_value("#param-num_frames") == low["num_frames"]


def flatten(schema: dict) -> dict:
    """A param's schema as the page reads it (pydantic's anyOf [{...}, {"type": "null"}])."""
    return {**next((s for s in schema.get("anyOf", []) if s.get("type") != "null"), {}), **schema}


def focused(page) -> str:
    """The focused element: its id, else its tag (the Advanced <summary>)."""
    return page.evaluate("() => document.activeElement.id || document.activeElement.tagName.toLowerCase()")


def open_file_chooser_with_space(page, attempts: int = 3):
    """Space on the focused image input opens the file chooser. A keystroke that Chromium
    drops on a loaded machine (CI's two cores, beside compiles) is pressed again, with the
    input still focused: a chooser that never opens still fails."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        assert focused(page) == "file"
        try:
            with page.expect_file_chooser(timeout=15_000) as chooser:
                page.keyboard.press("Space")
            return chooser.value
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def test_the_keyboard_alone_reaches_the_image_the_essentials_and_generate(ui, tmp_path):
    """Tab from the top of the page: the image input first (Space opens the file chooser),
    then the essentials in the order they are shown, then Advanced, then Generate; a field
    that is off (the seed under "randomize", the method with no frame rate to smooth to) is
    passed over until it is on. Every input has a label."""
    page = ui.page
    ui.open(advanced=False)
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea')]
        .filter(e => !(e.id && document.querySelector(`label[for="${e.id}"]`)?.textContent.trim())
                     && !e.getAttribute('aria-label')?.trim())
        .map(e => e.outerHTML)""")
    assert not unlabelled, unlabelled

    page.keyboard.press("Tab")
    assert focused(page) == "file"
    chooser = open_file_chooser_with_space(page)
    chooser.set_files(str(make_image(tmp_path / "photo.png", size=(800, 600))))
    ui.wait_caption("photo.png")

    order = []

    def tab(shift: bool = False) -> str:
        page.keyboard.press("Shift+Tab" if shift else "Tab")
        order.append(focused(page))
        return order[-1]

    assert [tab(), tab()] == ["param-motion_bucket_id", "randomize"]
    page.keyboard.press("Space")  # randomize off: the seed field is on, just before it
    assert tab(shift=True) == "param-seed"
    page.keyboard.type("42")
    assert [tab(), tab(), tab()] == ["randomize", "param-format", "param-interpolate_fps"]
    page.keyboard.type("14")  # a frame rate to smooth to: the method is on
    assert [tab(), tab(), tab(), tab()] == ["param-interpolation", "param-num_frames", "summary",
                                            "submit"], order
    assert page.is_enabled("#submit")
    assert page.input_value("#param-seed") == "42" and page.input_value("#param-interpolate_fps") == "14"


ESSENTIALS = ["motion_bucket_id", "seed", "format", "num_frames", "interpolate_fps", "interpolation"]


def boxes_overlap(a: dict, b: dict) -> bool:
    return not (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])


@pytest.mark.parametrize("width,height", [(1280, 800), (390, 844)], ids=["desktop", "phone"])
def test_layout_keeps_the_essentials_in_view_in_words(browser, server, info, tmp_path, width, height):
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(30_000)
    ui = UI(page, server)
    ui.open(advanced=False)
    # The essentials above the fold, in words with the API name beside; the rest under Advanced.
    for name in ESSENTIALS:
        box = page.locator(f"#param-{name}").bounding_box()
        assert box and box["y"] + box["height"] <= height, (name, box)
        label = page.locator(f"label[for=param-{name}]")
        assert name in label.inner_text() and label.inner_text().split()[0] != name
    assert page.locator("#submit").bounding_box()["y"] <= height
    assert page.is_hidden("#param-cond_aug") and page.is_hidden("#param-decoding_t")
    page.click("#advanced summary")
    assert page.is_visible("#param-cond_aug")
    # No label runs into its input (or into another row's).
    for row in page.locator(".param").all():
        label = row.locator("label").first.bounding_box()
        field = row.locator("input, select").first.bounding_box()
        assert not boxes_overlap(label, field), row.inner_text()
    if width == 1280:
        # The result beside the input: visible without scrolling once the video is there.
        page.click("#advanced summary")  # closed again
        ui.choose(make_image(tmp_path / "landscape.png", size=(800, 450)))
        page.click("#submit")
        ui.wait_status("succeeded")
        result = page.locator("#result").bounding_box()
        assert result["y"] + 100 <= height and result["x"] >= width / 2 - 50, result
        # This session's strip: the video, its params, and "use these settings again".
        seed = page.locator("#seed").get_attribute("data-seed")
        page.fill("#param-motion_bucket_id", "30")
        assert page.locator("#history-list li").count() == 1
        page.click("#history-list .again")
        assert page.input_value("#param-motion_bucket_id") == str(info["params"]["motion_bucket_id"]["default"])
        assert page.input_value("#param-seed") == seed and not page.is_checked("#randomize")
    # docs/img/ holds these: `UI_SCREENSHOTS=docs/img pytest tests/test_ui.py -k layout`
    # takes them again. Advanced closed, as the page first looks; the phone's above the
    # fold, the laptop's whole page (the image, every essential, the video, the strip).
    if page.locator("#advanced").get_attribute("open") is not None:
        page.click("#advanced summary")
    page.evaluate("() => { document.activeElement.blur(); window.scrollTo(0, 0) }")
    folder = Path(os.environ.get("UI_SCREENSHOTS") or tmp_path)
    page.screenshot(path=str(folder / f"ui-{width}.png"), full_page=width == 1280)
    context.close()
    assert not ui.script_errors, ui.script_errors
