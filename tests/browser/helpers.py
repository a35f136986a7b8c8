"""What the browser tests against ComfyUI share: the page helpers (`window.__t`, read from
our widgets' DOM and data attributes, in either node renderer), loading and queueing the
A/B example from the page, and a drag across an element.

    install_helpers(page)
    load_workflow(page, workflow)
    page.evaluate("(id) => __t.chart(id)", node)    # {points, runs, state, status, ...}
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from scripts.demo_ab import SMOKE_TRAIN, for_small_models
from scripts.workflow_format import ui_to_api

from .conftest import Models
from .launcher import close_dialogs

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
AB = "dev2pro_vs_dev_lora_ab"
TRAIN, COMPARE = "Dev2ProTrainLoRA", "Dev2ProCompareGrid"
RUN_TIMEOUT = 900

PAGE_HELPERS = """
window.__t = {
  app: window.comfyAPI.app.app,
  api: window.comfyAPI.api.api,
  setting(id, value) { return this.app.extensionManager.setting.set(id, value); },
  getSetting(id) { return this.app.extensionManager.setting.get(id); },
  node(id) { return this.app.rootGraph.getNodeById(id); },
  nodes() {
    return this.app.rootGraph.nodes.map(n => ({ id: n.id, type: n.type,
      registered: !!LiteGraph.registered_node_types[n.type], widgets: (n.widgets ?? []).map(w => w.name),
      values: n.serialize().widgets_values ?? [] }));
  },
  widget(id, name) { return this.node(id)?.widgets?.find(w => w.name === name) ?? null; },
  vueNode(id) { return document.querySelector(`[data-node-id="${id}"]`); },   // Vue renderer only
  vueCount() { return document.querySelectorAll('[data-node-id]').length; },
  box(el) {
    if (!el) return null;
    const r = el.getBoundingClientRect();
    return { x: r.x, y: r.y, width: r.width, height: r.height };
  },
  visibleAt(el) {
    // Is `el` what the user sees (and clicks) at its own centre?
    const r = el.getBoundingClientRect();
    if (r.width < 1 || r.height < 1) return false;
    const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
    return !!hit && (el === hit || el.contains(hit) || hit.contains(el));
  },
  inked(canvas) {
    // How many pixels of the canvas are drawn on.
    if (!canvas.width || !canvas.height) return 0;
    const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    let n = 0;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++;
    return n;
  },
  chart(id) {
    const el = this.widget(id, 'dev2pro_loss_chart')?.element;
    if (!el) return null;
    const canvas = el.querySelector('canvas'), host = this.vueNode(id);
    return { points: Number(el.dataset.points), runs: Number(el.dataset.runs), state: el.dataset.state,
             status: el.querySelector('.dev2pro-loss-status')?.textContent ?? '',
             inVueNode: !!host && host.contains(el), connected: el.isConnected,
             box: this.box(el), canvas: this.box(canvas), inked: this.inked(canvas),
             visible: this.visibleAt(canvas), node: this.box(host) };
  },
  sessions(id) {
    // The queue sessions of this node's runs in the extension's store ("h:<prompt id>": read
    // back from /history), oldest run first.
    return window.__dev2pro.lossStore.runs.filter(r => r.node === String(id))
      .sort((a, b) => a.started - b.started).map(r => r.session);
  },
  compare(id) {
    const el = this.widget(id, 'dev2pro_compare')?.element;
    if (!el) return null;
    const a = el.querySelector('.dev2pro-img-a'), b = el.querySelector('.dev2pro-img-b');
    const frame = el.querySelector('.dev2pro-compare-frame'), host = this.vueNode(id);
    return { count: Number(el.dataset.count), index: Number(el.dataset.index), mode: el.dataset.mode,
             split: Number(el.dataset.split), clip: a.style.clipPath,
             loadedA: a.complete && a.naturalWidth > 0, loadedB: b.complete && b.naturalWidth > 0,
             srcA: a.src, srcB: b.src,
             labelA: el.querySelector('.dev2pro-label-a').textContent,
             labelB: el.querySelector('.dev2pro-label-b').textContent,
             caption: el.querySelector('.dev2pro-compare-caption').textContent,
             inVueNode: !!host && host.contains(el), connected: el.isConnected,
             box: this.box(el), frame: this.box(frame),
             frameVisible: frame.style.display !== 'none' && this.visibleAt(frame), node: this.box(host),
             // ComfyUI's own previews of the node's ui "images" inside the Vue node
             previews: host ? [...host.querySelectorAll('img')].filter(i => !el.contains(i)).map(i => this.box(i)) : [] };
  },
  focus(id, scale = 1) {
    const c = this.app.canvas;
    c.ds.scale = scale;
    c.centerOnNode(this.node(id));
    c.setDirty(true, true);
  },
};
"""


def install_helpers(page):
    page.evaluate(PAGE_HELPERS)


def load_workflow(page, workflow: dict, settle_ms: int = 500):
    install_helpers(page)
    close_dialogs(page)   # a late first-run Templates dialog, not ours
    page.evaluate("""async (wf) => {
        await __t.app.loadGraphData(wf, true, true, null, { showMissingModelsDialog: false });
    }""", workflow)
    page.wait_for_timeout(settle_ms)


def read_ab_workflow() -> dict:
    return json.loads((EXAMPLES / f"{AB}.json").read_text())


def nodes_of(prompt: dict, kind: str) -> list[str]:
    return sorted((key for key, node in prompt.items() if node["class_type"] == kind), key=int)


def small_prompt(comfy, workflow: dict, steps: int) -> dict:
    """The API prompt of `workflow`, shrunk to the suite's small random models and `steps`."""
    return for_small_models(ui_to_api(workflow, comfy.object_info()), Models.flux, Models.dev2pro,
                            Models.clip_l, Models.vae, **{**SMOKE_TRAIN, "steps": steps})


def queue_and_watch(page, comfy, prompt: dict, sample, interval: float = 0.2):
    """Queue `prompt` from the page (with the page's workflow) and call sample() until the
    run completes. Returns (prompt id, history entry, [sample() results])."""
    prompt_id = page.evaluate("""async (prompt) => {
        const wf = __t.app.rootGraph.serialize();
        return (await __t.api.queuePrompt(0, { output: prompt, workflow: wf })).prompt_id;
    }""", prompt)
    samples = []
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        samples.append(sample())
        entry = comfy.history(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            break
        time.sleep(interval)
    entry = comfy.wait(prompt_id, timeout=max(1, deadline - time.monotonic()))
    return prompt_id, entry, samples


def changed_saved_values(nodes: list[dict], workflow: dict, types) -> list:
    """Ids of nodes of `types` whose saved widget values (holes left out) are not as many as
    the workflow file has: a widget of ours got into the saved workflow (or one went missing)."""
    saved = {n["id"]: n for n in workflow["nodes"]}
    return [n["id"] for n in nodes if n["type"] in types
            and len([v for v in n["values"] if v is not None]) != len(saved[n["id"]].get("widgets_values", []))]


def drag(page, box: dict, *fractions: float, steps: int = 5):
    """Press the mouse at the middle of `box` (page pixels), move through the given fractions
    of its width at mid height, release."""
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.5, y)
    page.mouse.down()
    for f in fractions:
        page.mouse.move(box["x"] + box["width"] * f, y, steps=steps)
    page.mouse.up()


def clipped_shot(page, path: Path, r: dict, pad: int = 8):
    """A screenshot of the page rectangle `r` (plus `pad`), cut to the viewport."""
    vw, vh = page.viewport_size["width"], page.viewport_size["height"]
    x, y = max(0, r["x"] - pad), max(0, r["y"] - pad)
    page.screenshot(path=str(path), clip={"x": x, "y": y, "width": min(vw, r["x"] + r["width"] + pad) - x,
                                          "height": min(vh, r["y"] + r["height"] + pad) - y})
