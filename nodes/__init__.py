"""ComfyUI V3 nodes of the pack: thin adapters from ComfyUI's types to fluxtrain.

Each file is one job: base.py (pick the training base, or take a MODEL), data.py (images and the
encoded dataset), train.py (the training run), apply.py (LoRA onto a MODEL),
compare.py (A/B grid and loss chart); common.py holds socket types and the
folder checks every node uses.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .apply import Dev2ProApplyLoRA
from .base import Dev2ProBaseFromModel, Dev2ProLoadTrainingBase
from .compare import COMPARE_NODES
from .data import DATA_NODES
from .train import Dev2ProTrainLoRA


def node_list() -> list[type[io.ComfyNode]]:
    return [Dev2ProLoadTrainingBase, Dev2ProBaseFromModel, *DATA_NODES, Dev2ProTrainLoRA, Dev2ProApplyLoRA, *COMPARE_NODES]


class Dev2ProExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()


async def comfy_entrypoint() -> Dev2ProExtension:
    return Dev2ProExtension()
