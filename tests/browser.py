"""Headless Chromium for the chat page tests: Debian's `chromium` and `chromium-driver`,
installed with apt-get the first time a session needs them (CI runs as root on a fresh
Debian machine; tests/system_tools.py), driven by selenium. Selenium itself downloads
nothing: the driver and browser paths are given, so Selenium Manager never runs.

Every browser started here resolves no host name but the loopback address
(--host-resolver-rules), and records its network log, so a test can assert that a page
asked for nothing outside the server.
"""
from __future__ import annotations

import json


def ensure_chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, apt-get installed once per session when missing
    (tests/system_tools.py, shared with the other Debian tools the tests need)."""
    from tests.system_tools import from_debian
    return from_debian("chromium", "chromium"), from_debian("chromedriver", "chromium-driver")


def start(paths: tuple[str, str], width: int = 1100, height: int = 800, phone: bool = False):
    """A headless browser; `phone`: a phone's viewport (width x height CSS pixels, touch)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    browser, driver = paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-default-apps",
                f"--window-size={width},{height}",
                # the network is blocked: no name resolves except the server's loopback address
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    if phone:
        options.add_experimental_option("mobileEmulation", {
            "deviceMetrics": {"width": width, "height": height, "pixelRatio": 2.0, "touch": True}})
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def requested_urls(driver) -> list[str]:
    """Every URL the page asked for since the last call (Chrome's performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls
