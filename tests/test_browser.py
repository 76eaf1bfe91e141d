"""The browser the page tests rely on: Debian's Chromium renders a page served on 127.0.0.1."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

from tests.browser import save_screenshot


def test_headless_chromium_renders_a_local_page_and_keeps_a_screenshot(
    browser: object, tmp_path: Path
) -> None:
    (tmp_path / "index.html").write_text(
        "<html><head><title>FedModel check</title></head>"
        "<body><p id='x'>epsilon 0.99</p><script>document.getElementById('x')"
        ".textContent += ' (rendered)'</script></body></html>"
    )
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(  # noqa: E731
        *args, directory=str(tmp_path)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        browser.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")  # type: ignore[attr-defined]
        assert browser.title == "FedModel check"  # type: ignore[attr-defined]
        text = browser.find_element("id", "x").text  # type: ignore[attr-defined]
        assert text == "epsilon 0.99 (rendered)", "JavaScript did not run"
        shot = save_screenshot(browser, "browser-check")
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.shutdown()
        server.server_close()
