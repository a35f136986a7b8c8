"""The A/B, made visible: a labelled side-by-side grid and both loss curves on one chart.

Dev2ProCompareGrid puts the images sampled with LoRA A next to those sampled with
LoRA B (same prompts, seeds and sampler), labelled with the base each LoRA was
trained on, the guidance it was trained at, the strength, seed and prompt. Its ui
carries every A and B image as a temp file for the frontend's A/B widget.
Dev2ProLossChart draws the runs' loss histories (raw faint, smoothed bold).
"""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..fluxtrain.images import image_to_tensor, tensor_to_image
from ..fluxtrain.plots import comparison_grid, loss_chart
from .common import CATEGORY, run_label
from .handles import RunHandle, RunType, require


def _save_temp(images, prefix: str, cls) -> list[dict]:
    """Each image as a temp PNG the frontend can load through /view."""
    return [dict(r) for r in ui.ImageSaveHelper.save_images(images, prefix, io.FolderType.temp, cls)]


def _describe(run: RunHandle | None, label: str, fallback: str) -> str:
    return label.strip() or run_label(run, fallback)


class Dev2ProCompareGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProCompareGrid",
            display_name="Compare LoRAs A/B (grid)",
            category=CATEGORY,
            description="Side-by-side grid: column A and column B, one row per image of the "
                        "batches (one per prompt / seed). Sample both with the same prompts, seeds, "
                        "sampler and Flux-dev; only the LoRA should differ.",
            inputs=[
                io.Image.Input("images_a", tooltip="Sampled with LoRA A (or without a LoRA)."),
                io.Image.Input("images_b", tooltip="Sampled with LoRA B."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="The prompt of each row, one per line (one line: every row)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=False, tooltip="The sampling seed, for the labels."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="The LoRA strength used, for the labels."),
                RunType.Input("run_a", optional=True, tooltip="The run that made LoRA A (for its label)."),
                RunType.Input("run_b", optional=True, tooltip="The run that made LoRA B (for its label)."),
                io.String.Input("label_a", default="", optional=True,
                                tooltip="Column A's title; empty: from run_a, else 'no LoRA'."),
                io.String.Input("label_b", default="", optional=True,
                                tooltip="Column B's title; empty: from run_b."),
            ],
            outputs=[io.Image.Output(display_name="grid")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images_a, images_b, prompts, seed, strength, run_a=None, run_b=None,
                label_a="", label_b="") -> io.NodeOutput:
        if images_a.shape[0] != images_b.shape[0]:
            raise ValueError(f"A has {images_a.shape[0]} images and B has {images_b.shape[0]}: sample "
                             "both with the same prompts and batch size so rows pair up")
        require(run_a, RunHandle, "run_a", optional=True)
        require(run_b, RunHandle, "run_b", optional=True)
        rows = images_a.shape[0]
        lines = [line.strip() for line in prompts.splitlines() if line.strip()] or [""]
        row_prompts = lines if len(lines) == rows else [lines[0]] * rows
        name_a = _describe(run_a, label_a, "no LoRA")
        name_b = _describe(run_b, label_b, "LoRA B")
        columns = [f"A: {name_a}, strength {strength if run_a or label_a else 0:g}",
                   f"B: {name_b}, strength {strength:g}"]
        row_labels = [f"{p[:60]}\nseed {seed}" + (f" #{i}" if len(lines) != rows and rows > 1 else "")
                      for i, p in enumerate(row_prompts)]
        grid = comparison_grid(
            [[tensor_to_image(images_a[i]), tensor_to_image(images_b[i])] for i in range(rows)],
            column_labels=columns, row_labels=row_labels,
            title="Same Flux-dev, prompts, seeds and sampler; only the LoRA differs",
            min_cell=256)
        grid_tensor = image_to_tensor(grid)
        saved_a = _save_temp(images_a, "dev2pro_a", cls)
        saved_b = _save_temp(images_b, "dev2pro_b", cls)
        compare = [{"prompt": row_prompts[i], "a": saved_a[i], "b": saved_b[i], "label_a": columns[0],
                    "label_b": columns[1], "seed": seed, "strength": strength} for i in range(rows)]
        preview = ui.PreviewImage(grid_tensor, cls=cls).as_dict()
        return io.NodeOutput(grid_tensor, ui={**preview, "dev2pro_compare": compare})


class Dev2ProLossChart(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProLossChart",
            display_name="Loss Chart (runs A/B)",
            category=CATEGORY,
            description="Both runs' loss per step on one chart: raw values faint, an exponential "
                        "moving average bold. Loss on a flow model is noisy by nature; compare the "
                        "smoothed curves.",
            inputs=[
                RunType.Input("run_a"),
                RunType.Input("run_b", optional=True),
                io.Float.Input("smoothing", default=0.9, min=0.0, max=0.999, step=0.01,
                               tooltip="EMA factor of the bold curve; 0 = raw."),
            ],
            outputs=[io.Image.Output(display_name="chart")],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, run_a, smoothing, run_b=None) -> io.NodeOutput:
        require(run_a, RunHandle, "run_a")
        require(run_b, RunHandle, "run_b", optional=True)
        curves = {}
        for run in (run_a, run_b):
            if run is not None:
                curves[f"{run.name}: {run_label(run, '')}"] = list(run.losses)
        chart = image_to_tensor(loss_chart(curves, smoothing=smoothing, title="Training loss"))
        ui_out = ui.PreviewImage(chart, cls=cls).as_dict()
        ui_out["dev2pro_losses"] = [{"run": r.name, "losses": list(r.losses), "base": r.base,
                                     "variant": r.variant, "guidance": r.guidance}
                                    for r in (run_a, run_b) if r is not None]
        return io.NodeOutput(chart, ui=ui_out)


COMPARE_NODES = [Dev2ProCompareGrid, Dev2ProLossChart]
