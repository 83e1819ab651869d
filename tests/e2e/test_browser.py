"""The playground (``/``) and the dashboard (``/dashboard``) in a real browser:
Debian's Chromium, headless, driven by selenium through chromium-driver
(``make test-deps`` installs both as root with apt; no browser download).

Three kinds of server: the tiny real model (``tiny_server``, chat through its
template), the same model behind a template that opens a ``<think>`` block
(so its output is reasoning), and the fake engine behind real uvicorn in a thread, whose scripted
reply carries Markdown and an XSS attempt and whose steps are slowed so a
stop can land mid-answer. Each test saves a PNG of its page under its tmp dir.
"""

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from server.app import create_app
from server.settings import Settings
from server.state import Served
from tests.e2e.conftest import ServerProcess, free_port, running_server
from tests.fake_engine import CharTokenizer, ScriptedRunner, fake_batcher
from tests.reliability.support import metric

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
BROWSER_MISSING = (
    "Chromium is not installed: apt-get install chromium chromium-driver (`make test-deps` does, as "
    "root), or deselect with -m 'not browser'"
)
WAIT_S = 15
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
REPLY = "## Result\n\n**Bold** and `code` " + XSS + "\n\n```python\nprint('<b>hi</b>')\n```\n\n" + "streaming " * 400


class SlowRunner(ScriptedRunner):
    """The scripted reply, one character a step, each step ``delay_s`` long."""

    def __init__(self, reply: str, delay_s: float) -> None:
        super().__init__(reply)
        self.delay_s = delay_s

    def step(self, scheduler_output):
        time.sleep(self.delay_s)
        return super().step(scheduler_output)


class ThreadServer:
    """A fake-engine app on real uvicorn, in a thread, on a free loopback port."""

    def __init__(self, api_key: str | None = None, delay_s: float = 0.004) -> None:
        self.runner = SlowRunner(REPLY, delay_s)
        self.batcher = fake_batcher(self.runner, num_blocks=256)
        served = Served(self.batcher, CharTokenizer(), "fake", 4096)
        app = create_app(Settings(api_key=api_key), ready=served)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + WAIT_S
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=WAIT_S)


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ThreadServer]:
    server = ThreadServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") or Path(CHROMIUM).exists()) or not Path(CHROMEDRIVER).exists():
        pytest.fail(BROWSER_MISSING)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout_s: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def element(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def open_page(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: driver.execute_script("return document.readyState") == "complete", what="the page")


def type_and_send(driver, text: str, max_tokens: int | None = None) -> None:
    """Type ``text`` into the message box and press Enter (the keyboard send)."""
    from selenium.webdriver.common.keys import Keys

    wait_for(lambda: element(driver, "send").is_enabled(), what="the send button")
    if max_tokens is not None:
        field = element(driver, "max-tokens")
        driver.execute_script("arguments[0].value = arguments[1]", field, str(max_tokens))
    element(driver, "message").send_keys(text, Keys.ENTER)


def answer_text(driver) -> str:
    return driver.execute_script(
        "const a = document.querySelectorAll('.message.assistant .content'); return a.length ? a[a.length - 1].textContent : ''"
    )


def answer_meta(driver) -> str:
    return driver.execute_script(
        "const m = document.querySelectorAll('.message.assistant .meta'); return m.length ? m[m.length - 1].textContent : ''"
    )


def test_playground_streams_an_answer_from_the_model(browser, tiny_server: ServerProcess, tmp_path: Path):
    open_page(browser, tiny_server.base_url + "/")
    assert "chat" in wait_for(lambda: element(browser, "mode").text, what="the model's mode")
    type_and_send(browser, "What is the capital of France?", max_tokens=300)
    lengths = []
    wait_for(
        lambda: lengths.append(len(answer_text(browser))) or (len(set(lengths)) >= 3 and answer_meta(browser)),
        what="text growing, then the timing line",
    )
    assert lengths == sorted(lengths), "the text only grows"
    meta = answer_meta(browser)
    assert "TTFT" in meta and "tokens/s" in meta and "finish:" in meta and "completion tokens" in meta
    browser.save_screenshot(str(tmp_path / "playground.png"))


# Every answer opens a thinking block (DeepSeek-R1's way): the random model never closes it.
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.split('</think>')[-1] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


@pytest.fixture(scope="module")
def thinking_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("thinking-browser")
    (folder / "thinking.jinja").write_text(THINKING_TEMPLATE)
    args = [str(tiny_llama_dir), "--served-model-name", "tiny", "--kv-cache-memory", "16MiB", "--dtype", "float32"]
    yield from running_server([*args, "--chat-template", str(folder / "thinking.jinja")], folder / "server.log")


def test_playground_folds_the_reasoning_above_the_answer(browser, thinking_server: ServerProcess, tmp_path: Path):
    open_page(browser, thinking_server.base_url + "/")
    assert "chat" in wait_for(lambda: element(browser, "mode").text, what="the model's mode")
    type_and_send(browser, "Think first.", max_tokens=12)
    wait_for(lambda: "finish: length" in answer_meta(browser), what="the finished answer")
    folded = browser.execute_script(
        "const r = document.querySelectorAll('.message.assistant .reasoning'); const last = r[r.length - 1];"
        "return [last.hidden, last.open, last.querySelector('.reasoning-text').textContent.length,"
        " last.nextElementSibling.className]"
    )
    assert folded[:2] == [False, False] and folded[2] > 0, "shown, folded, with the model's thinking in it"
    assert folded[3] == "content" and answer_text(browser) == "", "above the answer, which the cut left empty"
    browser.save_screenshot(str(tmp_path / "playground-reasoning.png"))


def test_model_output_is_text_never_markup(browser, fake_server: ThreadServer, tmp_path: Path):
    open_page(browser, fake_server.base_url + "/")
    type_and_send(browser, "show me", max_tokens=160)
    wait_for(lambda: "finish: length" in answer_meta(browser), what="the finished answer")
    assert XSS in answer_text(browser), "the tags are shown as text"
    assert browser.execute_script("return window.__xss === undefined")
    assert browser.execute_script("return document.querySelectorAll('.message.assistant script, .message.assistant img').length") == 0
    # The Markdown renders: a heading, bold, inline code and a code block (whose <b> stays text).
    counts = browser.execute_script(
        "const c = document.querySelector('.message.assistant .content'); return "
        "[c.querySelectorAll('h4').length, c.querySelectorAll('strong').length, c.querySelectorAll('pre "
        "code').length, c.querySelectorAll('b').length]"
    )
    assert counts == [1, 1, 1, 0]
    browser.save_screenshot(str(tmp_path / "playground-markdown.png"))


def test_stop_aborts_the_request_within_a_step(browser, fake_server: ThreadServer):
    """Stop reaches the engine as an abort, after which the request runs at
    most the one step already in flight."""
    aborts: list[tuple[str, int]] = []  # (request id, runner steps begun when the abort came)
    abort = fake_server.batcher.abort

    def recording_abort(request_id: str) -> None:
        aborts.append((request_id, fake_server.runner.num_steps))
        abort(request_id)

    fake_server.batcher.abort = recording_abort
    try:
        open_page(browser, fake_server.base_url + "/")
        type_and_send(browser, "a long one", max_tokens=3000)
        wait_for(lambda: len(answer_text(browser)) > 40, what="the answer to start")
        [running] = httpx.get(fake_server.base_url + "/stats").json()["requests"]
        element(browser, "stop-button").click()
        wait_for(
            lambda: metric(httpx.get(fake_server.base_url + "/metrics").text, "tokenstep_num_requests_running") == 0,
            what="0 running on /metrics",
        )
        wait_for(lambda: "finish: stopped" in answer_meta(browser), what="the stopped answer's line")
    finally:
        fake_server.batcher.abort = abort
    steps_at_abort = [steps for request_id, steps in aborts if request_id == running["id"]]
    assert steps_at_abort, "the stop never reached the engine as an abort"
    steps_after = [step for step in fake_server.runner.steps[steps_at_abort[0] :] if running["id"] in step]
    assert len(steps_after) <= 1, f"{len(steps_after)} steps ran the request after its abort"


def test_dashboard_shows_the_batcher_at_work(browser, fake_server: ThreadServer, tmp_path: Path):
    def load() -> None:
        with httpx.Client(timeout=60) as client:
            client.post(fake_server.base_url + "/v1/completions", json={"prompt": "x" * 40, "max_tokens": 600})

    background = [threading.Thread(target=load) for _ in range(3)]
    for thread in background:
        thread.start()
    try:
        open_page(browser, fake_server.base_url + "/dashboard")
        wait_for(
            lambda: browser.execute_script("return document.querySelectorAll('#requests tr[data-state=decoding]').length") >= 1,
            what="a decoding request row",
        )
        wait_for(lambda: int(element(browser, "blocks-used").text) > 0, what="blocks in use on the map")
        assert int(element(browser, "running").text) >= 1
        assert element(browser, "kv-usage").text.endswith("%")
        wait_for(lambda: element(browser, "step-ms").text.endswith("ms"), what="the step time")
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
    finally:
        for thread in background:
            thread.join(timeout=60)


def test_pages_ask_for_the_api_key_and_then_work(browser, tmp_path: Path):
    server = ThreadServer(api_key="sesame")
    try:
        assert httpx.get(server.base_url + "/").status_code == 200, "the page itself needs no key"
        assert httpx.get(server.base_url + "/stats").status_code == 401
        open_page(browser, server.base_url + "/")
        browser.execute_script("sessionStorage.clear()")
        open_page(browser, server.base_url + "/")
        wait_for(lambda: element(browser, "key-form").is_displayed(), what="the key form")
        assert "API key" in element(browser, "key-message").text
        element(browser, "key-input").send_keys("sesame")
        element(browser, "key-input").submit()
        type_and_send(browser, "hello", max_tokens=20)
        wait_for(lambda: "finish: length" in answer_meta(browser), what="an answer with the key")
        open_page(browser, server.base_url + "/dashboard")  # the key is kept for the tab
        wait_for(lambda: element(browser, "model-name").text == "fake", what="the dashboard's data")
        browser.save_screenshot(str(tmp_path / "key.png"))
    finally:
        browser.execute_script("sessionStorage.clear()")
        server.close()


def test_pages_are_accessible_and_fit_a_phone(browser, fake_server: ThreadServer):
    """Every control has a label; the pages lay out in a 375 px window without horizontal scrolling."""
    browser.set_window_size(375, 800)
    try:
        for path in ("/", "/dashboard"):
            open_page(browser, fake_server.base_url + path)
            unlabeled = browser.execute_script(
                "return [...document.querySelectorAll('input, textarea, select')].filter(e => !(e.labels && "
                "e.labels.length) && !e.getAttribute('aria-label')).map(e => e.id)"
            )
            assert unlabeled == []
            assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
    finally:
        browser.set_window_size(1100, 1000)
