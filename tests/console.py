"""`fedmodel console` for a test: started (the URL it announces, a clean stop after), or
its app asked in this process; and the tables of a page."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any

import httpx
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from fedmodel.console.app import create_app

FEDMODEL = [sys.executable, "-m", "fedmodel.cli"]
PAGE_WAIT_S = 120


def open_page(browser: Any, url: str, ready: str, count: int = 1) -> None:
    """Load `url` in `browser` and wait until its DOM holds `count` elements matching CSS
    `ready`. In loaded suites (CI stop 28, and 3 of 3 in a run with 3 workers) the privacy
    page's tables were missing from the DOM right after `get` returned, and there a moment
    later."""
    browser.get(url)
    WebDriverWait(browser, PAGE_WAIT_S, poll_frequency=0.2).until(
        lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ready)) >= count,
        f"{url}: fewer than {count} of {ready!r} after {PAGE_WAIT_S} s",
    )


@contextmanager
def serving(path: Path, *options: str) -> Iterator[str]:
    """`fedmodel console PATH --port 0 OPTIONS` running; yields the URL it announces."""
    process = subprocess.Popen(
        [*FEDMODEL, "console", str(path), "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        announced = process.stdout.readline()  # printed once the socket listens
        match = re.search(r"https?://\S+?/", announced)
        assert match, announced + process.stdout.read()
        # keep reading what it logs (to the test's output), so a full pipe never blocks it
        threading.Thread(target=_echo, args=(process.stdout,), daemon=True).start()
        yield match.group(0)
    finally:
        process.terminate()
        process.wait(timeout=30)


def fetch(path: Path, page: str) -> str:
    """GET `page` of a console over `path` in this process (the whole app: middleware,
    views and templates, as `fedmodel console PATH` serves them, minus the socket)."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(page)

    reply = asyncio.run(get())
    assert reply.status_code == 200, reply.text
    return reply.text


def _echo(stream: IO[str]) -> None:
    for line in stream:
        sys.stderr.write(f"console: {line}")


class _TableReader(HTMLParser):
    """The text of each body cell of the table with one id, row by row (as read: spaces
    and line breaks between its parts included)."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self.table_id, self.inside, self.in_body = table_id, False, False
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table" and ("id", self.table_id) in attrs:
            self.inside = True
        elif self.inside and tag == "tbody":
            self.in_body = True
        elif self.in_body and tag == "tr":
            self.rows.append([])
        elif self.in_body and tag == "td":
            self.rows[-1].append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self.inside = self.in_body = False

    def handle_data(self, data: str) -> None:
        if self.in_body and self.rows and self.rows[-1]:
            self.rows[-1][-1] += data


def table_rows(page: str, table_id: str) -> list[list[str]]:
    """The body rows of table `table_id` in `page`, as lists of cell texts, each with its
    white space collapsed as a browser shows it."""
    reader = _TableReader(table_id)
    reader.feed(page)
    return [[" ".join(cell.split()) for cell in row] for row in reader.rows]


def series(browser: object, chart: str) -> dict[str, list[float]]:
    """Each dataset of a Chart.js chart on the page: label -> y values."""
    found = browser.execute_script(  # type: ignore[attr-defined]
        f"return Chart.getChart('{chart}').data.datasets.map(d => [d.label, d.data.map(p => p.y)])"
    )
    return dict(found)
