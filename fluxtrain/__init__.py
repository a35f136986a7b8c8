"""fluxtrain: the ComfyUI-free engine of the Dev2Pro LoRA trainer.

Imports only torch, safetensors, numpy, pillow and comfy-aimdo, so it runs
headless (python -m fluxtrain.cli) and is tested without ComfyUI.
"""

__version__ = "0.1.0"
