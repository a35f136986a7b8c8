"""Dev2Pro LoRA Trainer for ComfyUI.

ComfyUI imports this folder as a package. The engine (fluxtrain/) knows nothing
of ComfyUI; nodes/ adapts it to ComfyUI's types; js/ is the frontend extension.
"""

WEB_DIRECTORY = "./js"

try:  # ComfyUI present: register the nodes through the V3 entry point.
    from .nodes import comfy_entrypoint  # noqa: F401
except ImportError as error:  # pragma: no cover - only outside ComfyUI
    if "comfy" not in str(error):
        raise
