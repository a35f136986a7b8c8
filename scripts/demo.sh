#!/usr/bin/env bash
# The main job in one command: the Dev2Pro-vs-dev A/B workflow end to end through a
# headless ComfyUI, writing the comparison grid and the loss chart to ab_results/.
# Without Flux weights it is a clearly labelled smoke demo on small generated models.
#
#   COMFYUI_PATH=~/ComfyUI bash scripts/demo.sh [--out DIR]
#
# ComfyUI is found through COMFYUI_PATH, or as the ComfyUI whose custom_nodes/ holds
# this pack. Its Python is COMFYUI_PYTHON, else its venv/ or .venv/, else one made
# here in .venv-comfyui/ from ComfyUI's requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
comfyui="${COMFYUI_PATH:-}"
if [ -z "$comfyui" ] && [ "$(basename "$(dirname "$PWD")")" = custom_nodes ]; then
  comfyui="$(cd ../.. && pwd)"
fi
if [ -z "$comfyui" ] || [ ! -f "$comfyui/main.py" ]; then
  echo "ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (or install this pack in ComfyUI/custom_nodes)" >&2
  exit 2
fi
python="${COMFYUI_PYTHON:-}"
for venv in venv .venv; do
  if [ -z "$python" ] && [ -x "$comfyui/$venv/bin/python" ]; then python="$comfyui/$venv/bin/python"; fi
done
if [ -z "$python" ]; then
  if [ ! -x .venv-comfyui/bin/python ]; then
    echo "making a Python environment for ComfyUI in .venv-comfyui/ (once)"
    python3 -m venv .venv-comfyui
    # ComfyUI asks for torchvision/torchaudio, which its core does not need; its server needs requests.
    grep -v -E '^(torch|torchvision|torchaudio)$' "$comfyui/requirements.txt" > .venv-comfyui/requirements.txt
    .venv-comfyui/bin/python -m pip install -q --disable-pip-version-check torch -r .venv-comfyui/requirements.txt requests
  fi
  python=.venv-comfyui/bin/python
fi
"$python" -m pip install -q --disable-pip-version-check "comfy-aimdo>=0.6.0"
COMFYUI_PATH="$comfyui" COMFYUI_PYTHON="$python" exec "$python" scripts/demo_ab.py "$@"
