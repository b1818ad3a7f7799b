"""The chat page's markdown, actions and error messages in a real browser (headless Chromium,
selenium) against the real server on loopback (tests/http_server.py over the tiny model).

To make the model "say" a given text, its tokenizer is wrapped so that every token id decodes
to that whole text followed by an end mark, and the server stops at the end mark: the reply
is the text, once, through the real engine, scheduler, HTTP stream and page.
"""
from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from tests import browser
from edge.engine.sampler import SamplingParams
from edge.launch.request import DEFAULT_PAGE_MAX_TOKENS, RequestDefaults
from tests.http_server import ready_state, running
from tests.test_chat_page import (CTX, assistant_content, new_engine, only_local_requests, open_page, send, served,
                                  wait)

SCREENSHOT_DIR = os.environ.get("EDGE_LLM_SCREENSHOT_DIR")

MARKDOWN = """## Fruit, by colour

Three to try:

- **apple**, red or green
- *banana*, yellow
- `kiwi`, brown outside

| Fruit | Colour | Per 100 g |
|-------|--------|-----------|
| apple | red    | 52 kcal   |
| kiwi  | green  | 61 kcal   |

More at [the fruit list](https://example.org/fruit).

```python
def ripe(fruit: str) -> bool:
    return fruit in {"apple", "kiwi"}  # a comment
```

<img src=x onerror="window.__pwned = 1"> and <script>window.__pwned = 2</script> stay text.
"""


END = "\u241e"      # the end mark: a stop string of the server's


class ScriptTokenizer:
    """The tiny model's tokenizer, except that every token id decodes to `text` and END."""

    def __init__(self, inner, text: str):
        self.inner, self.text = inner, text

    def encode(self, *args, **kwargs):
        return self.inner.encode(*args, **kwargs)

    def decode(self, ids, skip_special_tokens=True):
        return (self.text + END) * len(ids)


def scripted(tiny_bundle, text: str):
    engine = new_engine(tiny_bundle)
    engine.tokenizer = ScriptTokenizer(engine.tokenizer, text)
    state = ready_state(engine, defaults=RequestDefaults(max_tokens=None, sampling=SamplingParams(), stop=(END,)))
    events = []
    state.scheduler.listeners.append(lambda job, ev: events.append((job, ev)))
    return state, events


def settings(driver, max_tokens: str | None = None, temperature: str | None = None):
    driver.find_element(By.ID, "toggle-settings").click()
    if max_tokens is not None:
        box = driver.find_element(By.ID, "max-tokens")
        box.clear()
        box.send_keys(max_tokens)
    if temperature is not None:
        driver.find_element(By.ID, "temperature").send_keys(temperature)
    driver.find_element(By.ID, "toggle-settings").click()


def reply_done(driver):
    return wait(driver, lambda d: d.find_element(By.ID, "send").is_displayed()
                and re.search(r"\d+ tokens", d.find_element(By.ID, "stats").text))


def finished(events) -> list:
    """The jobs that have ended (their last event carries the usage), in order."""
    return [job for job, ev in events if ev.usage is not None]


def replies_done(driver, events, n: int) -> None:
    """Until the server has ended `n` replies and the page shows the last one done."""
    wait(driver, lambda d: len(finished(events)) == n)
    reply_done(driver)


def conversation_titles(driver) -> list[str]:
    return [b.text for b in driver.find_elements(By.CSS_SELECTOR, "#conversations li button.open")]


def test_markdown_renders_lists_tables_links_and_code_and_html_stays_inert(tiny_bundle, driver, chromium_paths,
                                                                             tmp_path):
    state, events = scripted(tiny_bundle, MARKDOWN)
    with running(state) as base:
        open_page(driver, base)
        send(driver, "Which fruit? A list, a table, a link and some code, please.")
        reply_done(driver)
        assert "".join(ev.text for _, ev in events) == MARKDOWN         # what the server sent
        assert driver.find_elements(By.CSS_SELECTOR, ".msg .note") == []
        job = next(j for j, ev in events if ev.usage is not None)
        assert job.params.max_tokens == DEFAULT_PAGE_MAX_TOKENS            # the page's reply budget
        assert job.params.stop_loops is True                                # and the loop guard
        content = assistant_content(driver)

        assert content.find_element(By.TAG_NAME, "h2").text == "Fruit, by colour"
        items = content.find_elements(By.CSS_SELECTOR, "ul > li")
        assert [li.text for li in items] == ["apple, red or green", "banana, yellow", "kiwi, brown outside"]
        assert items[0].find_element(By.TAG_NAME, "strong").text == "apple"
        assert items[1].find_element(By.TAG_NAME, "em").text == "banana"
        assert [th.text for th in content.find_elements(By.CSS_SELECTOR, "table th")] == ["Fruit", "Colour", "Per 100 g"]
        assert [td.text for td in content.find_elements(By.CSS_SELECTOR, "table tr:nth-child(2) td")] == \
            ["kiwi", "green", "61 kcal"]
        link = content.find_element(By.CSS_SELECTOR, "a[href]")
        assert (link.text, link.get_attribute("href")) == ("the fruit list", "https://example.org/fruit")
        assert link.get_attribute("rel") == "noopener noreferrer nofollow" and link.get_attribute("target") == "_blank"

        code = content.find_element(By.CSS_SELECTOR, "pre code.language-python")
        assert "def ripe(fruit: str) -> bool:" in code.text
        assert code.find_elements(By.CSS_SELECTOR, "span.hljs-keyword")      # highlighted
        assert code.find_element(By.CSS_SELECTOR, "span.hljs-comment").text == "# a comment"
        assert content.find_element(By.CSS_SELECTOR, "pre button.copy").text == "Copy"

        # the reply's HTML is shown as characters: no element, nothing ran
        text = content.text
        assert '<img src=x onerror="window.__pwned = 1">' in text and "<script>window.__pwned = 2</script>" in text
        for tag in ("img", "script"):
            assert content.find_elements(By.TAG_NAME, tag) == [], tag
        assert driver.execute_script("return window.__pwned") is None
        assert only_local_requests(driver, base) == []

        # the favicon is there
        icon = httpx.get(base + "/favicon.ico")
        assert icon.status_code == 200 and icon.headers["content-type"] == "image/x-icon"
        assert icon.content[:4] == b"\0\0\1\0"                       # an ICO header

        screenshot(driver, tmp_path, "chat-page.png")

        # the same at a phone's size
        phone = browser.start(chromium_paths, 390, 844, phone=True)
        try:
            open_page(phone, base)
            send(phone, "Which fruit?")
            reply_done(phone)
            assert phone.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
            assert phone.find_elements(By.CSS_SELECTOR, ".msg.assistant table th")
            screenshot(phone, tmp_path, "chat-page-phone.png")
        finally:
            phone.quit()


def screenshot(driver, tmp_path, name: str) -> None:
    """Into EDGE_LLM_SCREENSHOT_DIR when set (docs/ is made this way), else the test's tmp dir."""
    shot = Path(SCREENSHOT_DIR or tmp_path) / name
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000


def test_regenerate_replaces_the_last_reply(tiny_bundle, driver):
    state, events = served(new_engine(tiny_bundle))
    with running(state) as base:
        open_page(driver, base)
        settings(driver, max_tokens="6", temperature="1")
        send(driver, "w1 w2 w3")
        reply_done(driver)
        first = assistant_content(driver).text
        jobs = finished(events)
        assert len(jobs) == 1
        assert "Regenerate" in driver.find_element(By.CSS_SELECTOR, ".msg.assistant .regenerate").text
        driver.find_element(By.CSS_SELECTOR, ".msg.assistant .regenerate").click()
        replies_done(driver, events, 2)
        jobs = finished(events)
        assert jobs[1].prompt_ids == jobs[0].prompt_ids              # the same question again
        second = "".join(ev.text for job, ev in events if job is jobs[1])
        assert assistant_content(driver).text == second.strip()
        # one question, one answer: the new reply took the old one's place
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.user")) == 1
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 1
        stored = driver.execute_script("return JSON.parse(localStorage.getItem('edge-llm.conversations'))[0].messages")
        assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["content"] == second
        assert first                                  # the first reply was there to replace


def test_edit_forks_the_conversation(tiny_bundle, driver):
    state, events = served(new_engine(tiny_bundle))
    with running(state) as base:
        open_page(driver, base)
        settings(driver, max_tokens="4")
        send(driver, "w1 w2")
        reply_done(driver)
        send(driver, "w3 w4")
        replies_done(driver, events, 2)
        assert conversation_titles(driver) == ["w1 w2"]

        # edit the second question: the conversation forks there
        driver.find_elements(By.CSS_SELECTOR, ".msg.user .edit")[1].click()
        box = driver.find_element(By.CSS_SELECTOR, ".msg.user .edit-box")
        assert box.get_attribute("value") == "w3 w4"
        box.clear()
        box.send_keys("w5 w6")
        driver.find_element(By.CSS_SELECTOR, ".edit-send").click()
        replies_done(driver, events, 3)
        assert conversation_titles(driver) == ["⑂ w1 w2", "w1 w2"]
        users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user .content")]
        assert users == ["w1 w2", "w5 w6"]
        assert len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2

        # the server was asked with the first exchange and the edited question
        first, second, third = finished(events)
        asked = state.engine.tokenizer.decode(third.prompt_ids)
        assert "w1 w2" in asked and "w5 w6" in asked and "w3 w4" not in asked
        assert third.prompt_ids[:len(first.prompt_ids) - 1] == first.prompt_ids[:-1]

        # the original is untouched
        driver.find_elements(By.CSS_SELECTOR, "#conversations li button.open")[1].click()
        users = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user .content")]
        assert users == ["w1 w2", "w3 w4"]

        # Cancel leaves a message as it was
        driver.find_elements(By.CSS_SELECTOR, ".msg.user .edit")[0].click()
        driver.find_element(By.CSS_SELECTOR, ".edit-cancel").click()
        assert [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.user .content")] == ["w1 w2", "w3 w4"]


def test_delete_asks_first(tiny_bundle, driver):
    state, events = served(new_engine(tiny_bundle))
    with running(state) as base:
        open_page(driver, base)
        settings(driver, max_tokens="3")
        send(driver, "w1 w2")
        reply_done(driver)
        driver.find_element(By.ID, "new-chat").click()
        send(driver, "w7 w8")
        replies_done(driver, events, 2)
        assert conversation_titles(driver) == ["w7 w8", "w1 w2"]

        driver.find_elements(By.CSS_SELECTOR, "#conversations li button.delete")[1].click()
        ask = driver.find_element(By.CSS_SELECTOR, "#conversations li.confirm .ask")
        assert ask.text == "Delete “w1 w2”?"
        driver.find_element(By.CSS_SELECTOR, "#conversations li.confirm .keep").click()
        assert conversation_titles(driver) == ["w7 w8", "w1 w2"]               # kept

        driver.find_elements(By.CSS_SELECTOR, "#conversations li button.delete")[1].click()
        driver.find_element(By.CSS_SELECTOR, "#conversations li.confirm .confirm-delete").click()
        assert conversation_titles(driver) == ["w7 w8"]
        stored = driver.execute_script("return JSON.parse(localStorage.getItem('edge-llm.conversations'))")
        assert [c["title"] for c in stored] == ["w7 w8"]


def test_server_down_says_so_and_loses_nothing(tiny_bundle, driver):
    state, events = served(new_engine(tiny_bundle))
    with running(state) as base:
        open_page(driver, base)
    # the server is gone now; the page is still open
    send(driver, "w1 w2 w3")
    notice = wait(driver, lambda d: d.find_element(By.ID, "notice").is_displayed()
                  and "Cannot reach the server" in d.find_element(By.ID, "notice").text
                  and d.find_element(By.ID, "notice").text)
    assert base.removeprefix("http://") in notice and "edge-llm serve" in notice
    assert "Failed to fetch" not in notice
    wait(driver, lambda d: d.find_element(By.ID, "send").is_displayed())
    assert driver.find_element(By.ID, "prompt").get_attribute("value") == "w1 w2 w3"    # given back
    assert driver.find_elements(By.CSS_SELECTOR, ".msg") == []
    assert driver.find_element(By.ID, "stats").text == ""                                # no "stopped after 0"
    assert conversation_titles(driver) == ["New chat"]                                   # not renamed


def test_busy_and_context_full_say_what_to_do(tiny_bundle, driver):
    state, events = served(new_engine(tiny_bundle, seconds_per_token=0.05))
    state.scheduler.max_queue = 0                 # one request at a time, none waiting
    with running(state) as base:
        open_page(driver, base)
        settings(driver, max_tokens="5")

        # context full: a question longer than the whole context
        long = " ".join(f"w{i % 50}" for i in range(CTX * 2))
        driver.execute_script("document.getElementById('prompt').value = arguments[0]", long)
        driver.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
        notice = wait(driver, lambda d: d.find_element(By.ID, "notice").is_displayed() and d.find_element(By.ID, "notice").text)
        assert "no longer fits in the model's context" in notice and f"{CTX} tokens" in notice
        assert "new chat" in notice.lower()
        assert driver.find_element(By.ID, "prompt").get_attribute("value") == long
        assert driver.find_element(By.ID, "stats").text == ""
        assert conversation_titles(driver) == ["New chat"]
        driver.find_element(By.ID, "prompt").clear()

        # busy: another client holds the only place
        started, done = threading.Event(), threading.Event()

        def other_client():
            with httpx.stream("POST", base + "/v1/completions", timeout=60,
                              json={"prompt": "w1", "max_tokens": 400, "stream": True}) as r:
                for _ in r.iter_lines():
                    started.set()
                    if done.is_set():
                        break
        t = threading.Thread(target=other_client)
        t.start()
        try:
            assert started.wait(20)
            send(driver, "w2 w3")
            notice = wait(driver, lambda d: "busy" in d.find_element(By.ID, "notice").text
                          and d.find_element(By.ID, "notice").text)
            assert "The server is busy with other requests. Send again in" in notice
            assert driver.find_element(By.ID, "prompt").get_attribute("value") == "w2 w3"

            # with a place in the queue, the request waits: the reply bubble shows it is waiting
            state.scheduler.max_queue = 1
            driver.find_element(By.ID, "prompt").send_keys(Keys.ENTER)
            dots = wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .waiting"))
            assert dots[0].is_displayed() and dots[0].get_attribute("aria-label") == "waiting for the reply"
            assert driver.find_element(By.ID, "notice").is_displayed() is False
        finally:
            done.set()
            t.join(30)
        wait(driver, lambda d: assistant_content(d).text and not d.find_elements(By.CSS_SELECTOR, ".waiting"))
        reply_done(driver)
