"""Fixtures of the browser suite: headless Chromium (Debian's `chromium`, driven by
Playwright, never downloaded) against a real ComfyUI serving its real frontend with
this pack installed.

Without Chromium or Playwright the whole folder is skipped; without a ComfyUI
checkout (COMFYUI_PATH) the tests that need one are skipped. Either way it says so
loudly. Screenshots go to test-artifacts/browser/ (not committed).
"""

from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path

import pytest

from scripts.comfy_server import ComfyServer, copy_into, find_comfyui

from .launcher import browser_context, find_chromium, open_comfy, playwright_missing

HERE = Path(__file__).parent
REPO = HERE.parents[1]
ARTIFACTS = REPO / "test-artifacts" / "browser"

COMFYUI = find_comfyui()
CHROMIUM = find_chromium()
NO_BROWSER = (playwright_missing()
              or (None if CHROMIUM else "no Chromium found (apt-get install chromium, or set CHROMIUM_PATH)"))
NO_COMFYUI = "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout"
_skipped: list[str] = []


def pytest_collection_modifyitems(config, items):
    ours = [item for item in items if HERE in Path(str(item.path)).parents]
    for item in ours:
        reason = None
        if NO_BROWSER:
            reason = f"{NO_BROWSER}; the browser suite was SKIPPED"
        elif COMFYUI is None and "comfy" in item.fixturenames:
            reason = f"{NO_COMFYUI}; the browser tests against ComfyUI were SKIPPED"
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))
            if reason not in _skipped:
                _skipped.append(reason)
    for reason in _skipped:
        warnings.warn(pytest.PytestWarning(reason))


def pytest_terminal_summary(terminalreporter):
    for reason in _skipped:
        terminalreporter.write_sep("!", reason, red=True, bold=True)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def context(tmp_path_factory):
    """One Chromium for the session, on a fresh user folder."""
    with browser_context(tmp_path_factory.mktemp("chromium-profile")) as ctx:
        yield ctx


# ---------------------------------------------------------------- ComfyUI

FLUX, CLIP_L, VAE = "test-flux-dev.safetensors", "test-clip-l.safetensors", "test-flux-ae.safetensors"
DEV2PRO = "test-flux-dev2pro.safetensors"


class Models:
    flux, clip_l, vae, dev2pro = FLUX, CLIP_L, VAE, DEV2PRO


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyServer:
    """A real ComfyUI on loopback (throwaway base folder, this pack linked in), with the
    small random Flux / CLIP-L / VAE in its model folders and a kohya training folder
    in input/training/my_subject. It boots while the models are written."""
    from scripts.demo_ab import write_demo_images
    from scripts import demo_models as models

    server = ComfyServer(COMFYUI, tmp_path_factory.mktemp("browser-comfyui"))
    server.launch()
    cache = tmp_path_factory.mktemp("browser-models")
    try:
        started = time.monotonic()
        models.write_flux(cache / FLUX, seed=0)
        models.write_clip_l(cache / CLIP_L)
        models.write_flux_vae(cache / VAE)
        for folder, name, src in (("diffusion_models", FLUX, FLUX), ("diffusion_models", DEV2PRO, FLUX),
                                  ("text_encoders", CLIP_L, CLIP_L), ("vae", VAE, VAE)):
            copy_into(cache / src, server.model_path(folder, name))
        write_demo_images(server.input_dir / "training" / "my_subject")
        print(f"\n[browser] test models written in {time.monotonic() - started:.1f} s")
        server.wait_until_up()
        failure = server.pack_import_failure()
        assert failure is None, f"ComfyUI could not import the pack:\n{failure}"
        yield server
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
        for folder in server.models_dir.glob("*"):
            shutil.rmtree(folder, ignore_errors=True)  # ~1 GB of hard links / copies


@pytest.fixture(scope="session")
def comfy_page(comfy, context):
    """The ComfyUI page, booted, Templates dialog closed. Shared by the tests of the session
    (they run in file order); its console is checked after each test."""
    page = open_comfy(context, comfy.url)
    yield page
    (ARTIFACTS / "console.txt").write_text(page.console.text())  # the whole session's console
    page.close()


@pytest.fixture(autouse=True)
def no_console_problems_of_ours(request):
    """After each test: no error or warning from this pack's frontend code in the console."""
    yield
    if "comfy_page" in request.fixturenames:
        page = request.getfixturevalue("comfy_page")
        ours = page.console.ours()
        assert not ours, "console errors/warnings of ours:\n" + "\n".join(map(str, ours))


def screenshot(page, path: Path, clip: dict | None = None) -> Path:
    page.screenshot(path=str(path), clip=clip)
    return path


os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
