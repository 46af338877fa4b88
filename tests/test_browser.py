"""The chat page at ``/`` of ``mlx-qwenvl server`` (issue 22), in a real browser: headless
Chromium (Debian's ``chromium`` and ``chromium-driver``, which ``.ci/run`` installs) driven
through selenium, against a server subprocess on the demo model. One server and one browser
serve the whole module; each test starts from a freshly loaded page.

Without Chromium these tests fail (they are never skipped): install it, or run the rest of
the suite with ``--deselect tests/test_browser.py``."""

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from server_support import QUESTION, RED_CIRCLE, ROOT, data_uri, image_question, post, request, subprocess_server

KEY = "test-key-22"
AUTH = {"Authorization": f"Bearer {KEY}"}
KEY_ITEM = "mlx-qwenvl.api-key"  # chat.js keeps the key under this sessionStorage name
GREEN_SQUARE = ROOT / "examples" / "images" / "green_square_left.png"
FOLLOW_UP = "What shape is it?"
WAIT_S = 30
PAGE_LIMIT = 60_000  # bytes: the page, its style sheet and its script together


def chromium_paths() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.fail("the chat page's browser tests need Chromium and its driver, e.g. "
                    "`apt-get install chromium chromium-driver` (.ci/run installs them); "
                    f"found browser={browser}, chromedriver={driver}", pytrace=False)
    return browser, driver


@pytest.fixture(scope="module")
def webdriver_module():
    try:
        from selenium import webdriver
    except ImportError:
        pytest.fail("selenium is missing: pip install -e '.[test]'", pytrace=False)
    return webdriver


@pytest.fixture(scope="module")
def server():
    with subprocess_server("--model", "demo", "--api-key", KEY) as running:
        yield running


@pytest.fixture(scope="module")
def browser(webdriver_module):
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium_paths()
    options = webdriver_module.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1000,900", "--force-device-scale-factor=1", "--lang=en-US",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver_module.Chrome(options=options, service=Service(driver_path, log_output=subprocess.DEVNULL))
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


@pytest.fixture()
def page(browser, server):
    """The page freshly loaded, with the API key already in this tab's session storage; after
    the test, its console must hold no script error and no content security policy violation."""
    browser.get(server.url + "/")
    browser.execute_script(f"sessionStorage.setItem({KEY_ITEM!r}, {KEY!r})")
    browser.get_log("browser")  # start each test with an empty console
    page = Page(browser)
    yield page
    assert page.console_errors() == []


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory):
    """Where the run saves its screenshots: $MLX_QWENVL_SCREENSHOTS, else a pytest tmp folder."""
    folder = Path(os.environ.get("MLX_QWENVL_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """The chat page as a user meets it: controls found by their labels and names."""

    def __init__(self, driver):
        from selenium.webdriver.common.by import By

        self.driver, self.By = driver, By

    def find(self, css):
        return self.driver.find_element(self.By.CSS_SELECTOR, css)

    def all(self, css):
        return self.driver.find_elements(self.By.CSS_SELECTOR, css)

    def button(self, name):
        matches = [b for b in self.all("button") if b.accessible_name == name]
        assert len(matches) == 1, f"one button named {name!r}, found {len(matches)}"
        return matches[0]

    def labelled(self, label):
        """The form control whose accessible name is ``label``."""
        matches = [e for e in self.all("input, textarea") if e.accessible_name == label]
        assert len(matches) == 1, f"one control labelled {label!r}, found {len(matches)}"
        return matches[0]

    @property
    def log(self):
        return self.find('[role="log"]')

    @property
    def message(self):
        return self.labelled("Message")

    def attach(self, *paths):
        self.labelled("Attach image").send_keys("\n".join(str(p) for p in paths))

    def wait(self, predicate, what, timeout=WAIT_S):
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(lambda _: predicate())
        except Exception as error:  # noqa: BLE001 - TimeoutException, with what the page showed
            raise AssertionError(f"timed out waiting for {what}; the log shows: {self.log.text!r}") from error

    def ask(self, text, enter=True):
        """Type ``text`` and send it (Enter, or the Send button); wait until it is answered
        and the page is ready again. Returns the last entry of the log."""
        from selenium.webdriver.common.keys import Keys

        entries = len(self.entries())
        self.message.send_keys(text)
        if enter:
            self.message.send_keys(Keys.ENTER)
        else:
            self.button("Send").click()
        self.wait(lambda: len(self.entries()) > entries and self.ready(), "the answer")
        return self.entries()[-1]

    def entries(self):
        return self.all('[role="log"] > .msg')

    def ready(self):
        return self.button("Send").is_enabled() and not self.button("Stop").is_enabled()

    def console_errors(self):
        """Errors in the browser's console, but for the HTTP errors the tests provoke."""
        return [entry["message"] for entry in self.driver.get_log("browser")
                if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]]


def answer_text(entry) -> str:
    return entry.find_element("css selector", ".text").text


def usage_numbers(entry) -> dict:
    """The numbers of an answer's usage line, read from what it shows."""
    line = entry.find_element("css selector", ".usage").text
    found = re.search(r"prompt ([\d,]+) tokens \(([\d,]+) cached\).*answer ([\d,]+) tokens?, ([\d.]+) tokens/s", line)
    assert found, f"no usage numbers in {line!r}"
    prompt, cached, answer, rate = found.groups()
    return {"prompt": int(prompt.replace(",", "")), "cached": int(cached.replace(",", "")),
            "answer": int(answer.replace(",", "")), "rate": float(rate)}


# --------------------------------------------------------------------------------------------
# The page as served


def test_page_is_small_self_contained_and_locked_down(server):
    status, headers, html = request(server, "GET", "/")  # no key: the page holds no secret
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    directives = dict((d.split()[0], d.split()[1:]) for d in policy.split(";") if d.strip())
    assert directives["default-src"] == ["'none'"]
    for name in ("script-src", "style-src", "connect-src"):
        assert directives[name] == ["'self'"], (name, policy)
    assert directives["img-src"] == ["'self'", "data:", "blob:"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "unsafe" not in policy and "*" not in policy and "http" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"

    total = len(html)
    page = html.decode()
    for asset, kind in (("chat.css", "text/css"), ("chat.js", "text/javascript")):
        assert f'"{asset}"' in page
        status, asset_headers, body = request(server, "GET", "/" + asset)
        assert status == 200 and asset_headers["Content-Type"].startswith(kind)
        assert asset_headers["Content-Security-Policy"] == policy
        total += len(body)
        # nothing from the network: no URL of another origin anywhere in it
        assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", body), asset
        assert b"@import" not in body and b"url(" not in body, asset
    assert total < PAGE_LIMIT, f"the page weighs {total} bytes"
    assert not re.search(r"""(src|href)=["'](https?:|//)""", page)
    assert "<script>" not in page and "<style" not in page and " style=" not in page  # nothing inline
    # what the server told the page: the demo's image budget and its name
    assert 'data-max-pixels="63504"' in page and 'data-factor="28"' in page and 'data-model="demo"' in page
    assert "%MODEL%" not in page and "%MAX_PIXELS%" not in page

    status, _, body = request(server, "GET", "/nothing", headers=AUTH)
    assert status == 404 and "open / in a browser" in json.loads(body)["error"]["message"]
    status, _, _ = request(server, "POST", "/", raw=b"{}", headers=AUTH)
    assert status == 405
    status, _, _ = request(server, "GET", "/v1/models")  # the API still wants the key
    assert status == 401


def test_request_refused_unread_closes_its_connection(server):
    """The page's first question to a server with a key is refused (401) before its body is
    read: the connection must close, or the browser's next request on it (the same question
    with the key) would be read from the middle of the unread body."""
    import http.client

    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        body = json.dumps(image_question())
        connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        assert response.status == 401 and response.getheader("Connection") == "close"
        connection.request("POST", "/v1/chat/completions", body=body,
                           headers={"Content-Type": "application/json", **AUTH})
        response = connection.getresponse()
        assert response.status == 200 and json.loads(response.read())["choices"][0]["message"]["content"] == "red"
    finally:
        connection.close()


# --------------------------------------------------------------------------------------------
# In the browser


def test_accessible_controls(page):
    """Every control has its name, the conversation is a log, the keyboard reaches them all."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    assert page.labelled("Attach image").get_attribute("type") == "file"
    assert page.message.tag_name == "textarea"
    for name in ("Send", "Stop", "New chat"):
        page.button(name)
    assert page.log.get_attribute("role") == "log"
    assert page.ready()

    # the keyboard alone reaches every control, in reading order (Stop only while answering)
    page.driver.execute_script("arguments[0].focus()", page.button("New chat"))
    reached = []
    for _ in range(5):
        ActionChains(page.driver).send_keys(Keys.TAB).perform()  # (the file input takes keys as paths)
        reached.append(page.driver.switch_to.active_element.accessible_name)
    assert reached == ["Conversation", "Attach image", "Message", "Send", "Settings"], reached
    # Shift+Enter is a new line, not a question
    page.message.send_keys("first line", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "second line")
    assert page.message.get_attribute("value") == "first line\nsecond line"
    assert page.entries() == []


def test_conversation(page, server, screenshot_dir):
    """The red circle: 'red', a follow-up answered as the server answers it, cached tokens
    counted; a screenshot; New chat empties the log."""
    # a small image is sent as it is; one over the demo's budget (63,504 pixels) is made smaller
    page.attach(GREEN_SQUARE)
    page.wait(lambda: page.all("#attachments img"), "the green square's thumbnail")
    assert page.find("#attachments li .note").text == ""
    page.button(f"Remove {GREEN_SQUARE.name}").click()
    assert page.all("#attachments li") == []

    page.attach(RED_CIRCLE)
    page.wait(lambda: page.all("#attachments img"), "the red circle's thumbnail")
    note = page.find("#attachments li .note").text
    assert "resized here from 246×269 to 224×252" in note and "63,504 pixels" in note, note

    first = page.ask(QUESTION)
    assert "assistant" in first.get_attribute("class")
    assert answer_text(first) == "red"
    usage = usage_numbers(first)
    assert usage["prompt"] > 50 and usage["answer"] >= 1 and usage["rate"] > 0
    assert page.entries()[0].find_elements("css selector", "img"), "the question shows its image"

    # What the server answers to the same conversation (the page resized the picture to the
    # size the server itself would have used).
    expected = post(server, {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri()}},
                                     {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": FOLLOW_UP}]}, headers=AUTH)[2]["choices"][0]["message"]["content"]
    second = page.ask(FOLLOW_UP, enter=False)
    assert answer_text(second) == expected and expected
    follow = usage_numbers(second)
    assert follow["cached"] > 0, "the follow-up reuses the cached conversation"
    assert follow["cached"] >= usage["prompt"] - 1 and follow["prompt"] > usage["prompt"]

    shot = screenshot_dir / "chat-page.png"
    page.driver.save_screenshot(str(shot))
    width, height = png_size(shot)
    assert width == 1000 and height > 500, (width, height)
    print(f"screenshot: {shot}")

    page.button("New chat").click()
    assert page.entries() == [] and page.log.text == ""
    assert page.find("#hint").is_displayed()
    again = page.ask(QUESTION)  # a new conversation: the question alone, no earlier turn, no image
    assert len(page.entries()) == 2 and usage_numbers(again)["prompt"] < usage["prompt"]


def test_not_an_image(page, server, tmp_path):
    """A text file sent as an image: the server's refusal is one line in the log, the page is
    ready again, and the refused question does not stay in the conversation."""
    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not a picture\n")
    page.attach(notes)
    page.wait(lambda: "no preview" in page.find("#attachments li").text, "the attachment")
    refused = page.ask(QUESTION)
    assert "error" in refused.get_attribute("class")
    expected = post(server, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,"
                                           + base64.b64encode(notes.read_bytes()).decode()}},
        {"type": "text", "text": QUESTION}]}]}, headers=AUTH)[2]["error"]["message"]
    assert refused.text == f"Error 400: {expected}", refused.text
    assert "\n" not in refused.text
    assert page.ready()
    # the next question goes without the refused file
    page.attach(RED_CIRCLE)
    page.wait(lambda: page.all("#attachments img"), "the thumbnail")
    assert answer_text(page.ask(QUESTION)) == "red"


def test_context_full_and_busy(page):
    """A question over the model's context, and a busy server: each one line in the log."""
    from selenium.webdriver.common.keys import Keys

    page.driver.execute_script("arguments[0].value = arguments[1]", page.message, "word " * 5000)
    page.message.send_keys(Keys.END, Keys.ENTER)
    page.wait(lambda: page.ready() and page.all('[role="log"] .error'), "the error line")
    line = page.find('[role="log"] .error').text
    assert re.fullmatch(r"Error 400: .*the prompt is \d+ tokens but the model's context holds 4096 "
                        r"\(prompt plus answer\) — start a New chat to free the context", line), line

    # a busy server, answering as mlx_qwenvl.server_requests.busy() does (the browser's fetch
    # stands in for it: a real one needs a full queue)
    page.driver.execute_script("""window.fetch = async () => new Response(JSON.stringify({error: {
        message: "the server is busy (16 requests waiting); retry later", type: "server_error",
        param: null, code: "server_busy"}}),
        {status: 503, headers: {"Content-Type": "application/json", "Retry-After": "2"}});""")
    page.message.send_keys("hello", Keys.ENTER)
    page.wait(lambda: page.ready() and len(page.all('[role="log"] .error')) == 2, "the busy line")
    assert page.all('[role="log"] .error')[1].text == (
        "Server busy (503): the server is busy (16 requests waiting); retry later (try again in 2 s)")


def test_stop(page, server):
    """A long answer, stopped: it stops growing, the page is ready, the server is free.

    The demo model answers in one word, so the long answer comes from sampling at a very high
    temperature (which flattens the distribution over its 151k-token vocabulary, so the
    end-of-turn token is hardly ever drawn), with a fixed seed so it is the same every run,
    and up to 4000 tokens (the demo's context is 4096)."""
    from selenium.webdriver.common.keys import Keys

    page.find("#settings summary").click()
    page.labelled("Max tokens").send_keys("4000")
    page.labelled("Temperature").send_keys("10")
    page.labelled("Seed").send_keys("3")
    page.message.send_keys("Tell me a long story.", Keys.ENTER)
    answer = '[role="log"] .assistant .text'
    page.wait(lambda: page.all(answer) and len(page.find(answer).text) > 60, "a long answer to start")
    assert page.button("Stop").is_enabled() and not page.button("Send").is_enabled()
    page.button("Stop").click()
    page.wait(page.ready, "the page to be ready after Stop", timeout=5)
    text = page.find(answer).text
    time.sleep(1.5)
    assert page.find(answer).text == text, "the answer grew after Stop"
    assert page.find('[role="log"] .assistant .usage').text == "stopped"
    assert page.driver.switch_to.active_element == page.message

    # the server stopped too: it reports the request cancelled, well short of 4000 tokens ...
    def last_request():
        _, _, body = request(server, "GET", "/health")
        return json.loads(body)["last_request"] or {}

    page.wait(lambda: last_request().get("outcome") == "cancelled", "the server to cancel the answer", timeout=10)
    assert last_request()["generated_tokens"] < 4000
    # ... and a new question is answered at once
    page.button("New chat").click()
    for name in ("Max tokens", "Temperature", "Seed"):
        page.labelled(name).clear()
    page.attach(RED_CIRCLE)
    page.wait(lambda: page.all("#attachments img"), "the thumbnail")
    started = time.monotonic()
    assert answer_text(page.ask(QUESTION)) == "red"
    assert time.monotonic() - started < 15


def test_broken_stream(page):
    """A stream that ends before ``[DONE]``, or fails, is one line in the log, never a page
    that waits forever. (The browser's fetch is replaced by one whose stream breaks.)"""
    from selenium.webdriver.common.keys import Keys

    break_stream = """
        const ending = arguments[0];
        window.fetch = async () => new Response(new ReadableStream({start(stream) {
            const chunk = (delta) => `data: ${JSON.stringify({choices: [{index: 0, delta}]})}\n\n`;
            stream.enqueue(new TextEncoder().encode(chunk({role: "assistant", content: ""}) + chunk({content: "par"})));
            setTimeout(() => ending === "close" ? stream.close() : stream.error(new TypeError("network error")), 200);
        }}), {status: 200, headers: {"Content-Type": "text/event-stream"}});"""
    for ending, line in (("close", "The connection closed before the answer was complete"),
                         ("error", "Error: network error")):
        page.driver.execute_script(break_stream, ending)
        page.message.send_keys(QUESTION, Keys.ENTER)
        page.wait(lambda: page.ready() and "error" in page.entries()[-1].get_attribute("class"), "the error line")
        assert page.entries()[-1].text.startswith(line), page.entries()[-1].text
        assert answer_text(page.entries()[-2]) == "par"  # what came is kept on screen


def test_api_key_asked_once(page, screenshot_dir):
    """Without a key the server answers 401: the page asks once, keeps it for the tab, and
    sends it from then on."""
    from selenium.webdriver.common.keys import Keys

    page.driver.execute_script("sessionStorage.clear()")
    page.message.send_keys("hello", Keys.ENTER)
    page.wait(lambda: page.find("#key-dialog").is_displayed(), "the API key dialog")
    key_box = page.labelled("API key")
    assert key_box.get_attribute("type") == "password"
    assert page.driver.switch_to.active_element == key_box
    page.driver.save_screenshot(str(screenshot_dir / "chat-page-api-key.png"))
    key_box.send_keys(KEY, Keys.ENTER)
    page.wait(page.ready, "the answer")
    assert "assistant" in page.entries()[-1].get_attribute("class"), (page.log.text, page.console_errors())
    assert page.driver.execute_script(f"return sessionStorage.getItem({KEY_ITEM!r})") == KEY
    page.ask("hello again")
    assert not page.find("#key-dialog").is_displayed()
    assert "assistant" in page.entries()[-1].get_attribute("class")

    # a wrong key: asked again; refusing to give one is one line in the log
    page.driver.execute_script(f"sessionStorage.setItem({KEY_ITEM!r}, 'wrong')")
    page.message.send_keys("and again", Keys.ENTER)
    page.wait(lambda: page.find("#key-dialog").is_displayed(), "the API key dialog")
    assert "did not take the key" in page.find("#key-dialog").text
    page.labelled("API key").send_keys(Keys.ESCAPE)
    page.wait(page.ready, "the page to be ready")
    assert page.entries()[-1].text.startswith("Error 401: invalid or missing API key")


def test_drop_and_paste(page):
    """Images dropped on the page or pasted into it are attached like picked ones."""
    send_file = """
        const [name, b64, kind, target] = arguments;
        const files = new DataTransfer();
        files.items.add(new File([Uint8Array.from(atob(b64), (c) => c.charCodeAt(0))], name, {type: "image/png"}));
        const init = {bubbles: true, cancelable: true};
        if (kind === "drop") {
            for (const type of ["dragover", "drop"]) {
                target.dispatchEvent(new DragEvent(type, {...init, dataTransfer: files}));
            }
        } else {
            target.dispatchEvent(new ClipboardEvent("paste", {...init, clipboardData: files}));
        }"""
    encoded = base64.b64encode(GREEN_SQUARE.read_bytes()).decode()
    page.driver.execute_script(send_file, "dropped.png", encoded, "drop", page.find("main"))
    page.wait(lambda: len(page.all("#attachments img")) == 1, "the dropped image")
    page.driver.execute_script(send_file, "pasted.png", encoded, "paste", page.message)
    page.wait(lambda: len(page.all("#attachments img")) == 2, "the pasted image")
    assert [e.text for e in page.all("#attachments .name")] == ["dropped.png", "pasted.png"]
    assert page.message.get_attribute("value") == ""


def test_light_and_dark_are_readable(page, screenshot_dir):
    """In the light and the dark system theme, every kind of text on the page contrasts with
    its background as WCAG AA asks of body text (4.5:1)."""
    page.attach(RED_CIRCLE)
    page.wait(lambda: page.all("#attachments img"), "the thumbnail")
    page.ask(QUESTION)
    pairs = {"page": ("body", "body"), "message box": ("#message", "#message"),
             "question": (".msg.user .text", ".msg.user"), "answer": (".msg.assistant .text", ".msg.assistant"),
             "usage line": (".msg.assistant .usage", ".msg.assistant"), "Send": ("#send", "#send"),
             "New chat": ("#new-chat", "#new-chat")}
    found = {}
    try:
        for scheme in ("light", "dark"):
            page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {
                "features": [{"name": "prefers-color-scheme", "value": scheme}]})
            for name, (text, background) in pairs.items():
                colours = page.driver.execute_script(
                    "return [getComputedStyle(document.querySelector(arguments[0])).color,"
                    " getComputedStyle(document.querySelector(arguments[1])).backgroundColor]", text, background)
                found[scheme, name] = (contrast(*map(rgb, colours)), colours)
            page.driver.save_screenshot(str(screenshot_dir / f"chat-page-{scheme}-theme.png"))
            found[scheme, "background"] = luminance(rgb(page.driver.execute_script(
                "return getComputedStyle(document.body).backgroundColor")))
    finally:
        page.driver.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    low = {key: value for key, value in found.items() if key[1] != "background" and value[0] < 4.5}
    assert not low, low
    assert found["light", "background"] > 0.8 and found["dark", "background"] < 0.05, found


# --------------------------------------------------------------------------------------------
# Helpers


def rgb(css: str) -> tuple:
    return tuple(int(v) for v in re.findall(r"\d+", css)[:3])


def luminance(colour) -> float:
    def channel(v):
        v /= 255
        return v / 12.92 if v <= 0.03928 else ((v + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in colour)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])

