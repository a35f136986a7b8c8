"""Drive ComfyUI's real frontend in headless Chromium through Playwright.

Playwright only drives a Chromium that is already installed (Debian's `chromium`,
or CHROMIUM_PATH); it never downloads one. The browser runs with a fresh user
folder, so ComfyUI opens with its first-run Templates dialog, which `open_comfy`
closes before anyone looks at the canvas.

    with browser_context(tmp_dir) as context:
        page = open_comfy(context, server.url)
        ...
        page.console.ours()      # console errors/warnings from this pack's scripts
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
PACK_URL_PART = "/extensions/"  # our scripts are served at /extensions/<pack folder>/
OUR_MARKERS = ("dev2pro",)      # file names and log prefix of this pack's frontend code


def find_chromium() -> str | None:
    """CHROMIUM_PATH, else a chromium / chromium-browser / google-chrome on PATH."""
    env = os.environ.get("CHROMIUM_PATH")
    if env:
        return env if Path(env).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def playwright_missing() -> str | None:
    """Why Playwright cannot be used here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package `playwright` is not installed (pip install -r tests/requirements-browser.txt)"
    return None


@dataclass
class Console:
    """Everything the page printed, and its uncaught errors."""
    messages: list = field(default_factory=list)  # (type, text, url)

    def record(self, msg):
        loc = msg.location or {}
        self.messages.append((msg.type, msg.text, loc.get("url", "")))

    def record_error(self, error):
        self.messages.append(("pageerror", f"{error}\n{getattr(error, 'stack', '')}", ""))

    def problems(self) -> list:
        return [m for m in self.messages if m[0] in ("error", "warning", "pageerror")]

    def ours(self) -> list:
        """Errors and warnings that name this pack or come from its scripts."""
        return [m for m in self.problems()
                if any(k in (m[1] + " " + m[2]).lower() for k in OUR_MARKERS)]

    def text(self) -> str:
        return "\n".join(f"[{t}] {text} ({url})" for t, text, url in self.messages)


@contextlib.contextmanager
def browser_context(user_data_dir: Path, *, width: int = 1600, height: int = 1300):
    """A persistent Chromium context on a fresh user folder."""
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise RuntimeError("no Chromium found: set CHROMIUM_PATH or apt-get install chromium")
    Path(user_data_dir).mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": width, "height": height}, chromium_sandbox=False)
        try:
            yield context
        finally:
            context.close()


def open_comfy(context, url: str, *, timeout_ms: int = 120_000):
    """A page on ComfyUI with the app booted, this pack's extension registered, the graph
    drawn and the Templates dialog closed. The page's console is in `page.console`."""
    page = context.new_page()
    page.console = Console()
    page.on("console", page.console.record)
    page.on("pageerror", page.console.record_error)
    page.set_default_timeout(timeout_ms)
    page.goto(url, wait_until="domcontentloaded")
    wait_for_app(page, timeout_ms)
    close_dialogs(page)
    return page


def wait_for_app(page, timeout_ms: int = 120_000):
    page.wait_for_function(
        """() => {
            const app = window.comfyAPI?.app?.app;
            return !!(app && app.rootGraphInternal && app.canvas && window.__dev2pro
                      && app.extensionManager);
        }""", timeout=timeout_ms)
    # The first workflow is loaded after the extensions' setup; let the canvas settle.
    page.wait_for_timeout(1000)


def close_dialogs(page, quiet_ms: int = 1500, timeout_ms: int = 30_000):
    """Close the first-run Templates dialog (and any other modal) with its close button,
    until none has shown for `quiet_ms` (on a busy machine the dialog opens late)."""
    waited = quiet = 0
    while quiet < quiet_ms:
        if waited > timeout_ms:
            raise AssertionError(f"a dialog stayed open over the canvas: {open_dialogs(page)}")
        if page.locator(".p-dialog:visible").count() == 0:
            quiet += 250
        else:
            quiet = 0
            close = page.locator(".p-dialog:visible .p-dialog-close-button, "
                                 ".p-dialog:visible button[aria-label='Close'], "
                                 ".p-dialog:visible button:visible:has(i.pi-times)")
            if close.count():
                close.first.click()
            else:
                page.keyboard.press("Escape")
        page.wait_for_timeout(250)
        waited += 250


def open_dialogs(page) -> list[str]:
    """What the visible dialogs are (their labelling element's id, else their first words)."""
    return page.evaluate("""() => [...document.querySelectorAll('.p-dialog')]
        .filter(d => d.offsetParent !== null || d.getClientRects().length)
        .map(d => d.getAttribute('aria-labelledby') || d.textContent.trim().slice(0, 80))""")
