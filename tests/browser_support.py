"""A real headless Chromium (Debian `chromium` + `chromium-driver`) driven by Selenium.

Nothing is downloaded: the browser and the driver are the system's binaries, handed to Selenium
explicitly (so Selenium Manager never runs).  Selenium's calls block, while the server under test
runs on the test's event loop: every browser call goes through a thread (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
)


def browser_missing() -> str | None:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is not installed (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


class Browser:
    """One Chromium tab, with async wrappers for what the tests need."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.call(self.driver.get, url)

    async def js(self, script: str, *args: Any) -> Any:
        return await self.call(self.driver.execute_script, script, *args)

    async def js_async(self, script: str, *args: Any) -> Any:
        """Run `script` as an async function body; its `return` value comes back."""
        wrapped = (
            "const done = arguments[arguments.length - 1];"
            f"(async (...args) => {{ {script} }})(...Array.from(arguments).slice(0, -1))"
            ".then(done, (e) => done({error: String(e && e.stack || e)}));"
        )
        result = await self.call(self.driver.execute_async_script, wrapped, *args)
        if isinstance(result, dict) and "error" in result and len(result) == 1:
            raise AssertionError(f"page script failed: {result['error']}")
        return result

    async def text(self, element_id: str) -> str:
        return await self.js(
            "const e = document.getElementById(arguments[0]); return e ? e.textContent : null;",
            element_id,
        )

    async def wait(
        self, script: str, *args: Any, timeout: float = 10.0, what: str = "condition"
    ) -> Any:
        """Poll `script` (a JS expression body returning a value) until it is truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.js(script, *args)
            if last:
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(f"{what} not met within {timeout}s (last value {last!r})")

    async def click(self, element_id: str) -> None:
        await self.js("document.getElementById(arguments[0]).click();", element_id)

    async def fill(self, element_id: str, value: str) -> None:
        await self.js(
            "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
            "e.dispatchEvent(new Event('input', {bubbles: true}));",
            element_id,
            value,
        )

    async def submit(self, form_id: str) -> None:
        await self.js("document.getElementById(arguments[0]).requestSubmit();", form_id)

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.call(self.driver.save_screenshot, str(path))
        return path

    async def new_tab(self) -> None:
        await self.call(self.driver.switch_to.new_window, "tab")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    missing = browser_missing()
    if missing is not None:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="asobi-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def browser(chromium: Any) -> Iterator[Browser]:
    """A fresh tab for each test (its own sessionStorage); the others are closed after it."""
    chromium.switch_to.new_window("tab")
    yield Browser(chromium)
    keep = chromium.window_handles[0]
    for handle in chromium.window_handles[1:]:
        chromium.switch_to.window(handle)
        chromium.close()
    chromium.switch_to.window(keep)
