"""Dev2Pro LoRA Trainer for ComfyUI.

ComfyUI imports this folder as a package. The engine (fluxtrain/) knows nothing
of ComfyUI; nodes/ adapts it to ComfyUI's types; js/ is the frontend extension.
"""

import importlib.util

WEB_DIRECTORY = "./js"

# Inside ComfyUI, register the nodes through the V3 entry point. Outside it (tests,
# headless use) there is nothing to register; any other import error is real and shows.
if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401
