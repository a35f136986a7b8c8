"""Fixtures of the ComfyUI integration suite: one real ComfyUI per session, and the
random models it samples with. Without a ComfyUI checkout this folder is skipped,
loudly; the rest of the suite runs as usual."""

from __future__ import annotations

import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.comfy_server import ComfyServer, copy_into, find_comfyui
from scripts import demo_models as models

COMFYUI = find_comfyui()
NOT_FOUND = ("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout; "
             "the ComfyUI integration suite was SKIPPED")
HERE = Path(__file__).parent
_skipped: list = []


def pytest_collection_modifyitems(config, items):
    if COMFYUI is not None:
        return
    _skipped[:] = [item for item in items if HERE in Path(str(item.path)).parents]
    if _skipped:
        warnings.warn(pytest.PytestWarning(NOT_FOUND))
    for item in _skipped:
        item.add_marker(pytest.mark.skip(reason=NOT_FOUND))


def pytest_terminal_summary(terminalreporter):
    if _skipped:
        terminalreporter.write_sep("!", NOT_FOUND, red=True, bold=True)


@pytest.fixture(scope="session")
def _comfy_process(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfyui-base")
    server = ComfyServer(COMFYUI, base)
    server.launch()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def comfy_server(_comfy_process, model_cache) -> ComfyServer:
    """A ComfyUI started on loopback with a throwaway base directory and this pack installed.
    It boots while the models are generated."""
    started = time.monotonic()
    _comfy_process.wait_until_up()
    print(f"\n[comfyui] server up ({time.monotonic() - started:.1f} s after the models were ready)")
    return _comfy_process


@dataclass(frozen=True)
class ModelNames:
    """File names as the loader nodes list them."""
    flux: str = "test-flux-dev.safetensors"        # models/diffusion_models
    clip_l: str = "test-clip-l.safetensors"        # models/text_encoders
    vae: str = "test-flux-ae.safetensors"          # models/vae


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """Random models, generated once per session."""
    cache = tmp_path_factory.mktemp("comfyui-models")
    started = time.monotonic()
    names = ModelNames()
    models.write_flux(cache / names.flux, seed=0)
    models.write_clip_l(cache / names.clip_l)
    models.write_flux_vae(cache / names.vae)
    print(f"\n[comfyui] generated test models in {time.monotonic() - started:.1f} s")
    yield cache
    shutil.rmtree(cache, ignore_errors=True)  # ~1 GB; pytest keeps the last 3 session folders


@pytest.fixture(scope="session")
def comfy_models(comfy_server, model_cache) -> ModelNames:
    """The random Flux, CLIP-L and VAE, placed in the server's model folders."""
    names = ModelNames()
    placed = [copy_into(model_cache / name, comfy_server.model_path(folder, name))
              for folder, name in (("diffusion_models", names.flux), ("text_encoders", names.clip_l),
                                   ("vae", names.vae))]
    yield names
    for path in placed:
        path.unlink(missing_ok=True)
