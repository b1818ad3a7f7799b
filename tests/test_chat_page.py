"""The chat page at / in a real browser (headless Chromium from Debian, driven by selenium)
against a real server on loopback: the in-process uvicorn of tests/http_server.py over the
tiny model, and `edge-llm serve` itself as a subprocess. Every browser here can resolve no
name but 127.0.0.1, and the tests check in its network log that the page asked for nothing
outside the server.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import httpx
import pytest

from edge.engine.engine import Engine
from tests import browser
from tests.http_server import endless_engine, ready_state, running, serve_process

from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

CTX = 512
SCREENSHOT = Path(os.environ.get("EDGE_LLM_SCREENSHOT_DIR", "")) if os.environ.get("EDGE_LLM_SCREENSHOT_DIR") else None

# what the model "says" in the HTML test: each token id decodes to all of these, in an order of its own
HTML_PIECES = ['<script>window.__pwned = 1</script>', '<img src=x onerror="window.__pwned = 2">',
               ' <b>not bold</b> ', '&amp; <a href="javascript:alert(1)">link</a> ']


class HtmlTokenizer:
    """The tiny model's tokenizer, except that every id decodes to pieces of HTML: the real
    engine, scheduler and HTTP stream then deliver markup the page must show as text."""

    def __init__(self, inner):
        self.inner = inner

    def encode(self, *args, **kwargs):
        return self.inner.encode(*args, **kwargs)

    def decode(self, ids, skip_special_tokens=True):
        n = len(HTML_PIECES)
        return "".join(HTML_PIECES[(i + k) % n] for i in ids for k in range(n))


def new_engine(tiny_bundle, seconds_per_token: float = 0.0) -> Engine:
    engine = endless_engine(tiny_bundle, CTX)     # random weights: run until stopped or the limit
    if seconds_per_token:
        forward = engine.model.forward_batch       # every engine step is one of these

        def slow_forward(*args, **kwargs):
            time.sleep(seconds_per_token)
            return forward(*args, **kwargs)
        engine.model.forward_batch = slow_forward
    return engine


def served(engine):
    """A running server over `engine` that records every event the scheduler emits."""
    state = ready_state(engine)
    events = []
    state.scheduler.listeners.append(lambda job, ev: events.append((job, ev)))
    return state, events


def open_page(driver, base: str):
    driver.get("about:blank")
    browser.requested_urls(driver)                      # drop the log so far
    driver.get(base + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(base + "/")
    wait(driver, lambda d: "· " in d.find_element(By.ID, "model").text)


def wait(driver, condition, timeout: float = 20):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def assistant_content(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".msg.assistant .content")[-1]


def only_local_requests(driver, base: str) -> list[str]:
    urls = browser.requested_urls(driver)
    assert urls, "the performance log recorded no requests at all"
    return [u for u in urls if not (u.startswith(base + "/") or u == "about:blank")]


def send(driver, text: str):
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def test_streams_a_reply_and_stop_cancels_it_on_the_server(tiny_bundle, driver):
    state, events = served(new_engine(tiny_bundle, seconds_per_token=0.03))
    with running(state) as base:
        open_page(driver, base)
        send(driver, "w5 w6 w7")
        first = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .content p")
                     and assistant_content(d).text)
        grown = wait(driver, lambda d: len(assistant_content(d).text) > len(first) + 10 and assistant_content(d).text)
        assert grown.startswith(first.split()[0])       # the same reply, streaming in
        assert driver.find_element(By.ID, "stop").is_displayed()
        assert not driver.find_element(By.ID, "send").is_displayed()
        driver.find_element(By.ID, "stop").click()

        # the server saw the client go and cancelled the job well before the context filled
        last = wait(driver, lambda d: next((ev for _, ev in reversed(events) if ev.usage is not None), None), 10)
        assert last.finish_reason == "cancelled"
        assert 0 < last.usage.completion_tokens < CTX // 2
        wait(driver, lambda d: state.metrics.requests.get("499") == 1, 10)
        assert not state.scheduler.busy

        # the partial reply stays, marked, and is what the server had sent
        note = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .note"))
        assert "stopped" in note[0].text
        streamed = "".join(ev.text for _, ev in events)
        shown = assistant_content(driver).text
        assert shown and streamed.startswith(shown.strip())
        assert driver.find_element(By.ID, "send").is_displayed()
        assert "stopped" in driver.find_element(By.ID, "stats").text

        # the conversation (with the interrupted reply) is in localStorage and comes back on reload
        driver.refresh()
        wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .note"))
        assert driver.find_element(By.CSS_SELECTOR, ".msg.user .content").text == "w5 w6 w7"
        assert only_local_requests(driver, base) == []


def test_html_in_a_reply_shows_as_text_and_stats_follow(tiny_bundle, driver):
    engine = new_engine(tiny_bundle)
    engine.tokenizer = HtmlTokenizer(engine.tokenizer)
    state, events = served(engine)
    with running(state) as base:
        open_page(driver, base)
        driver.find_element(By.ID, "toggle-settings").click()
        driver.find_element(By.ID, "max-tokens").send_keys("12")
        driver.find_element(By.ID, "temperature").send_keys("0")
        send(driver, "w1 w2")
        stats = wait(driver, lambda d: re.search(r"\d+ tokens/s", d.find_element(By.ID, "stats").text)
                     and d.find_element(By.ID, "stats").text)
        job, last = next((j, ev) for j, ev in events if ev.usage is not None)
        assert job.params.max_tokens == 12 and job.params.sampling.temperature == 0.0
        reply = "".join(ev.text for _, ev in events)
        assert "<script>" in reply and "onerror" in reply

        content = assistant_content(driver)
        shown = content.get_attribute("textContent")
        for piece in ("<script>window.__pwned = 1</script>", '<img src=x onerror="window.__pwned = 2">',
                      "<b>not bold</b>", '<a href="javascript:alert(1)">link</a>'):
            assert piece in shown, piece                               # the markup, as characters
        assert driver.execute_script("return window.__pwned") is None
        for tag in ("script", "img", "b", "a"):
            assert content.find_elements(By.TAG_NAME, tag) == [], tag
        used = last.usage.prompt_tokens + last.usage.completion_tokens
        assert f"{last.usage.completion_tokens} tokens" in stats and f"context {used} / {CTX}" in stats

        # completion mode: the continuation goes into the text box, as text
        driver.find_element(By.CSS_SELECTOR, "#mode option[value=completion]").click()
        box = driver.find_element(By.ID, "completion-text")
        box.send_keys("w3 w4")
        driver.find_element(By.ID, "send").click()
        wait(driver, lambda d: len(events) > 0 and d.find_element(By.ID, "send").is_displayed()
             and box.get_attribute("value") != "w3 w4")
        value = box.get_attribute("value")
        assert value.startswith("w3 w4") and "<img src=x" in value
        assert driver.execute_script("return window.__pwned") is None
        assert only_local_requests(driver, base) == []


@pytest.fixture
def edge_llm_serve(tiny_bundle, tmp_path):
    """`edge-llm serve` itself, on a free loopback port, with an API key."""
    env = {**os.environ, "EDGE_LLM_HOME": str(tmp_path / "home"), "EDGE_LLM_API_KEY": "sekrit"}
    with serve_process(["-m", str(tiny_bundle), "--ctx", str(CTX), "--max-tokens", "24", "--temperature", "0"],
                       env) as base:
        yield base


def test_edge_llm_serve_page_loads_offline_and_asks_for_the_key(edge_llm_serve, chromium_paths, tmp_path):
    base = edge_llm_serve
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(base + "/v1/models").status_code == 401          # the API itself still needs the key
    assert httpx.get(base + "/static/defaults.json").json() == {"max_tokens": 24}   # serve's --max-tokens is smaller
    d = browser.start(chromium_paths, 390, 844, phone=True)           # a phone's screen
    try:
        open_page(d, base)
        assert d.execute_script("return window.innerWidth") == 390
        assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        assert not d.find_element(By.ID, "settings").is_displayed()      # opens on 401, below
        send(d, "w9 w8")
        notice = wait(d, lambda d: d.find_element(By.ID, "notice").is_displayed() and d.find_element(By.ID, "notice").text)
        assert "API key" in notice
        assert d.find_element(By.ID, "prompt").get_attribute("value") == "w9 w8"    # the question is given back
        d.find_element(By.ID, "api-key").send_keys("sekrit")
        d.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
        wait(d, lambda d: re.search(r"\d+ tokens/s", d.find_element(By.ID, "stats").text))
        n = int(re.match(r"(\d+) tokens", d.find_element(By.ID, "stats").text).group(1))
        assert 1 <= n <= 24                                                # within serve's --max-tokens
        assert re.fullmatch(r"(w\d+ ?)+", assistant_content(d).text)       # the tiny model's words
        assert only_local_requests(d, base) == []
        shot = (SCREENSHOT or tmp_path) / "page-phone.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert d.save_screenshot(str(shot)) and shot.stat().st_size > 1000
    finally:
        d.quit()
