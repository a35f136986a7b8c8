"""This pack's frontend in ComfyUI's real frontend (the comfyui-frontend-package the
ComfyUI checkout pins), in headless Chromium, against a real ComfyUI on loopback:

- every shipped workflow opens with no missing node, with the loss chart on each
  training node and the A/B widget on each compare node, and our widgets add nothing
  to the saved workflow;
- the A/B example (shrunk to the small random models) queued from the page: the loss
  charts gain points while the runs train, show both runs of the queue, and the
  compare widget shows two labelled images whose split follows a drag;
- after a page reload the last runs are still there (from localStorage, then from
  /history alone);
- nothing of ours in the browser console (checked after every test by conftest).

The tests share one page and run in file order. Screenshots: test-artifacts/browser/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .helpers import (COMPARE, EXAMPLES, TRAIN, changed_saved_values, clipped_shot, drag,
                      install_helpers, load_workflow, nodes_of, queue_and_watch, read_ab_workflow, small_prompt)
from .launcher import close_dialogs, open_dialogs, wait_for_app

STEPS = 6            # per training run: enough to watch the chart grow

# Classic renderer only: the node drawn on the canvas, and ComfyUI's own image preview there.
CANVAS_HELPERS = """
Object.assign(window.__t, {
  rect(id) {
    // The node (title included) in page pixels.
    const c = this.app.canvas, n = this.node(id), r = c.canvas.getBoundingClientRect();
    const title = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30, s = c.ds.scale;
    const x = r.left + (n.pos[0] + c.ds.offset[0]) * s, y = r.top + (n.pos[1] - title + c.ds.offset[1]) * s;
    return { x, y, width: n.size[0] * s, height: (n.size[1] + title) * s };
  },
  async previewVsWidget(id, frames = 3) {
    // Where ComfyUI lays out and really draws this node's own image preview (node.imgs, drawn
    // by the frontend in a deferred pass), next to our A/B widget, all in page pixels.
    const c = this.app.canvas, n = this.node(id), cr = c.canvas.getBoundingClientRect();
    const k = cr.width / c.canvas.width, s = c.ds.scale;
    const left = cr.left + (n.pos[0] + c.ds.offset[0]) * s, top = cr.top + (n.pos[1] + c.ds.offset[1]) * s;
    const own = new Set(n.imgs ?? []), draws = [];
    const proto = CanvasRenderingContext2D.prototype, orig = proto.drawImage;
    proto.drawImage = function (img, ...a) {
      const t = this.getTransform();
      const ox = cr.left + t.e * k, oy = cr.top + t.f * k;   // this node's origin when drawing it
      if (this.canvas === c.canvas && own.has(img) && Math.abs(ox - left) < 2 && Math.abs(oy - top) < 2) {
        const [x, y, w, h] = a.length >= 8 ? a.slice(4, 8) : a.length >= 4 ? a : [a[0], a[1], img.naturalWidth, img.naturalHeight];
        draws.push({ x: ox + t.a * x * k, y: oy + t.d * y * k, width: t.a * w * k, height: t.d * h * k });
      }
      return orig.call(this, img, ...a);
    };
    try {
      for (let i = 0; i < frames; i++) {
        c.setDirty(true, true);
        await new Promise(r => requestAnimationFrame(r));
        await new Promise(r => setTimeout(r, 0));   // the deferred image pass (a microtask)
      }
    } finally { proto.drawImage = orig; }
    const pv = n.widgets.find(w => w.name === '$$canvas-image-preview');
    const laid = pv && !pv.hidden ? { x: left, y: top + pv.y * s, width: n.size[0] * s, height: (pv.computedHeight ?? 0) * s } : null;
    return { widget: this.compare(id).box, images: n.imgs?.length ?? 0,
             preview: !!pv, hidden: !!pv?.hidden, laid, draws };
  },
});
"""


def helpers(page):
    install_helpers(page)
    page.evaluate(CANVAS_HELPERS)


def load(page, workflow: dict):
    load_workflow(page, workflow)
    page.evaluate(CANVAS_HELPERS)


def node_shot(page, path: Path, node_id: int):
    """A screenshot of one node, cut to the viewport."""
    page.wait_for_timeout(250)
    clipped_shot(page, path, page.evaluate("(id) => __t.rect(id)", node_id))


def test_the_pack_extension_is_served_and_registered(comfy, comfy_page):
    served = comfy.get("/extensions")
    ours = [p for p in served if "dev2pro" in p]
    assert any(p.endswith("/dev2pro.js") for p in ours), served
    helpers(comfy_page)
    names = comfy_page.evaluate("() => __t.app.extensions.map(e => e.name)")
    assert "dev2pro.LoraTrainer" in names


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_shipped_workflow_opens_with_no_missing_node_and_our_widgets(comfy, comfy_page, artifacts, path):
    page = comfy_page
    workflow = json.loads(path.read_text())
    load(page, workflow)
    assert page.locator(".p-dialog:visible").count() == 0, f"a dialog opened on load: {open_dialogs(page)}"
    nodes = page.evaluate("() => __t.nodes()")
    assert len(nodes) == len(workflow["nodes"])
    missing = [n["type"] for n in nodes if not n["registered"]]
    assert not missing, f"{path.name}: node types not registered in the frontend: {missing}"
    for n in nodes:
        if n["type"] == TRAIN:
            assert "dev2pro_loss_chart" in n["widgets"], f"no loss chart on node {n['id']}"
        if n["type"] == COMPARE:
            assert "dev2pro_compare" in n["widgets"], f"no A/B widget on node {n['id']}"
    changed = changed_saved_values(nodes, workflow, (TRAIN, COMPARE))
    assert not changed, f"{path.name}: our widget changed what the workflow saves on nodes {changed}"
    page.screenshot(path=str(artifacts / f"workflow_{path.stem}.png"))


@pytest.fixture(scope="module")
def ab_live(comfy, comfy_page, artifacts):
    """The A/B example queued from the page (shrunk to the test models), watched while it runs."""
    page = comfy_page
    workflow = read_ab_workflow()
    load(page, workflow)
    prompt = small_prompt(comfy, workflow, STEPS)
    first, second = (int(k) for k in nodes_of(prompt, TRAIN))
    for key in nodes_of(prompt, TRAIN):
        if prompt[key]["inputs"]["name"] == "ab/dev":
            prompt[key]["inputs"]["guidance"] = 3.5
    page.evaluate("(id) => __t.focus(id)", first)
    shot_mid = None

    def sample():
        nonlocal shot_mid
        s = page.evaluate("(ids) => ids.map(id => __t.chart(id))", [first, second])
        if shot_mid is None and s[0]["state"] == "running" and 0 < s[0]["points"] < STEPS:
            shot_mid = artifacts / "loss_chart_running.png"
            node_shot(page, shot_mid, first)
        return s

    prompt_id, entry, samples = queue_and_watch(page, comfy, prompt, sample, interval=0.15)
    page.wait_for_timeout(500)
    return {"prompt": prompt, "id": prompt_id, "entry": entry, "samples": samples, "first": first,
            "second": second, "compare": int(nodes_of(prompt, COMPARE)[0]), "shot_mid": shot_mid}


def _overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] - 0.5 and b["x"] < a["x"] + a["width"] - 0.5
            and a["y"] < b["y"] + b["height"] - 0.5 and b["y"] < a["y"] + a["height"] - 0.5)


def assert_preview_clear_of_widget(page, node: int):
    """ComfyUI's own preview of the node's ui "images" (laid out as a widget after ours and
    drawn on the canvas) must never lie under or over our A/B widget (a DOM element)."""
    p = page.evaluate("(id) => __t.previewVsWidget(id)", node)
    assert p["images"] >= 1, f"the grid preview never reached the node: {p}"
    assert p["widget"] and p["widget"]["height"] > 50, p
    for box in ([p["laid"]] if p["laid"] else []) + p["draws"]:
        assert not _overlap(p["widget"], box), f"the grid preview {box} overlaps the A/B widget {p['widget']}: {p}"
    return p


def test_loss_chart_gains_points_while_the_run_trains(comfy_page, ab_live, artifacts):
    page = comfy_page
    first = [s[0] for s in ab_live["samples"]]
    running = [c for c in first if c["state"] == "running"]
    assert running, f"the chart never showed a running run: {first[-3:]}"
    counts = [c["points"] for c in running]
    assert any(0 < n < STEPS for n in counts), f"no point seen mid-run: {counts}"
    assert counts == sorted(counts), f"points went backwards: {counts}"
    assert len(set(counts)) >= 2, f"the chart did not grow while running: {counts}"
    mid = next(c for c in running if 0 < c["points"] < STEPS)
    assert f"/{STEPS}" in mid["status"] and "ETA" in mid["status"] and "loss" in mid["status"], mid["status"]
    assert ab_live["shot_mid"] is not None and ab_live["shot_mid"].is_file()

    final = page.evaluate("(ids) => ids.map(id => __t.chart(id))", [ab_live["first"], ab_live["second"]])
    for chart in final:
        assert chart["state"] == "done" and chart["points"] == STEPS, chart
        assert "done" in chart["status"]
        assert chart["runs"] == 2, "both runs of the queue should be drawn together"
    page.evaluate("(id) => __t.focus(id)", ab_live["second"])
    node_shot(page, artifacts / "loss_chart_done_two_runs.png", ab_live["second"])


def test_compare_widget_shows_two_labelled_images_and_the_split_follows_a_drag(comfy_page, ab_live, artifacts):
    page = comfy_page
    node = ab_live["compare"]
    expected = ab_live["entry"]["outputs"][str(node)]["dev2pro_compare"]
    page.evaluate("(id) => __t.focus(id)", node)
    page.wait_for_function("(id) => { const c = __t.compare(id); return c && c.count >= 1 && c.loadedA && c.loadedB; }",
                           arg=node, timeout=30_000)
    c = page.evaluate("(id) => __t.compare(id)", node)
    assert c["count"] == len(expected) == 1
    assert expected[0]["a"]["filename"] in c["srcA"] and expected[0]["b"]["filename"] in c["srcB"]
    assert c["labelA"] == expected[0]["label_a"] and "dev2pro" in c["labelA"]
    assert c["labelB"] == expected[0]["label_b"] and "dev" in c["labelB"] and "3.5" in c["labelB"]
    assert expected[0]["prompt"] in c["caption"] and f"seed {expected[0]['seed']}" in c["caption"]
    node_shot(page, artifacts / "compare_widget.png", node)
    assert_preview_clear_of_widget(page, node)

    box = page.evaluate("(id) => __t.compare(id).frame", node)
    assert box and box["width"] > 50 and box["height"] > 50, box
    before = page.evaluate("(id) => __t.node(id).pos.slice()", node)
    drag(page, box, 0.7, 0.2)
    after = page.evaluate("(id) => __t.compare(id)", node)
    assert after["split"] == pytest.approx(0.2, abs=0.03), after
    assert after["clip"].replace("px", "").startswith("inset(0 8"), after["clip"]   # A shows on 20 %
    assert page.evaluate("(id) => __t.node(id).pos.slice()", node) == before, "the drag moved the node"
    node_shot(page, artifacts / "compare_widget_dragged.png", node)
    assert_preview_clear_of_widget(page, node)

    page.locator(".dev2pro-compare .dev2pro-mode[data-mode=b]").click()
    assert page.evaluate("(id) => __t.compare(id).mode", node) == "b"
    page.locator(".dev2pro-compare .dev2pro-mode[data-mode=split]").click()
    assert page.evaluate("(id) => __t.compare(id).mode", node) == "split"


def _reload(page):
    page.reload(wait_until="domcontentloaded")
    wait_for_app(page)
    close_dialogs(page)
    helpers(page)


def _restored(page, ab_live):
    page.wait_for_function(
        """([a, b, c]) => { const x = __t.chart(a), y = __t.chart(b), z = __t.compare(c);
                            return x && y && z && x.points > 0 && y.points > 0 && z.count > 0; }""",
        arg=[ab_live["first"], ab_live["second"], ab_live["compare"]], timeout=30_000)
    charts = page.evaluate("(ids) => ids.map(id => __t.chart(id))", [ab_live["first"], ab_live["second"]])
    for chart in charts:
        assert chart["points"] == STEPS and chart["state"] == "done" and chart["runs"] == 2, chart
    return page.evaluate("(id) => __t.sessions(id)", ab_live["first"])


def test_the_last_runs_survive_a_page_reload(comfy_page, ab_live, artifacts):
    page = comfy_page
    _reload(page)
    types = page.evaluate("() => __t.app.rootGraph.nodes.map(n => n.type)")
    assert TRAIN in types and COMPARE in types, "the frontend did not restore the A/B workflow"
    sessions = _restored(page, ab_live)
    assert sessions == [ab_live["id"]], f"not the run this page saw (from localStorage): {sessions}"
    page.evaluate("(id) => __t.focus(id)", ab_live["first"])
    node_shot(page, artifacts / "loss_chart_after_reload.png", ab_live["first"])

    # Another browser (nothing in localStorage): the runs come back from /history.
    page.evaluate("() => { for (const k of Object.keys(localStorage)) if (k.startsWith('dev2pro.')) localStorage.removeItem(k); }")
    _reload(page)
    sessions = _restored(page, ab_live)
    assert sessions == [f"h:{ab_live['id']}"], f"not read back from /history: {sessions}"
    page.wait_for_function("(id) => __t.compare(id)?.loadedA", arg=ab_live["compare"], timeout=30_000)


def test_without_our_scripts_the_nodes_still_work_as_plain_nodes(comfy, context, artifacts):
    """A broken frontend module (here: one that throws on import) must leave ComfyUI and the
    nodes usable: the workflow opens, nothing of ours is added, the saved values are intact."""
    page = context.new_page()
    page.route("**/extensions/**/dev2pro_chart.js",
               lambda route: route.fulfill(status=200, content_type="text/javascript",
                                           body="throw new Error('dev2pro test: broken module');"))
    try:
        page.goto(comfy.url, wait_until="domcontentloaded")
        page.wait_for_function("() => !!(window.comfyAPI?.app?.app?.rootGraphInternal && window.comfyAPI.app.app.canvas)",
                               timeout=120_000)
        page.wait_for_timeout(1500)
        close_dialogs(page)
        assert page.evaluate("() => window.__dev2pro === undefined"), "the broken extension ran anyway"
        workflow = read_ab_workflow()
        load_workflow(page, workflow)
        close_dialogs(page)
        nodes = page.evaluate("() => __t.nodes()")
        assert all(n["registered"] for n in nodes)
        for n in nodes:
            assert not any(w.startswith("dev2pro_") for w in n["widgets"])
        changed = changed_saved_values(nodes, workflow, {n["type"] for n in nodes})
        assert not changed, f"saved values changed on nodes {changed}"
        page.screenshot(path=str(artifacts / "degraded_without_extension.png"))
    finally:
        page.close()
