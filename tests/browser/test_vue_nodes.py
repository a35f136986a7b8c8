"""This pack's frontend with ComfyUI's Vue node renderer ("Nodes 2.0", the setting
`Comfy.VueNodes.Enabled` of comfyui-frontend-package 1.35.9), in headless Chromium
against a real ComfyUI:

- the A/B example opens with the loss chart and the A/B widget inside the Vue nodes,
  laid out with a real size (not collapsed), and adds nothing to the saved workflow;
- queued from the page, the loss charts gain points and draw them, the A/B widget shows
  both images, and its split follows a drag without moving the node;
- the node help page (js/docs/) opens from the node's context menu;
- after a page reload (Vue renderer still on) the runs are restored; switching back to the
  classic renderer leaves working widgets;
- nothing of ours in the console.

Runs on its own page; the renderer setting is put back to classic when done.
Screenshots: test-artifacts/browser/vue_*.png.
"""

from __future__ import annotations

import re

import pytest

from .helpers import (COMPARE, TRAIN, read_ab_workflow, changed_saved_values, clipped_shot, drag,
                      install_helpers, load_workflow, nodes_of, queue_and_watch, small_prompt)
from .launcher import close_dialogs, open_comfy, wait_for_app

VUE_SETTING = "Comfy.VueNodes.Enabled"
STEPS = 4


def focus(page, node: int, scale: float = 1.0):
    page.evaluate("([id, scale]) => __t.focus(id, scale)", [node, scale])
    page.wait_for_timeout(400)


def node_shot(page, path, node: int):
    clipped_shot(page, path, page.evaluate("(id) => __t.box(__t.vueNode(id))", node))


# The frontend asks for a help page in the user's language first (docs/<Node>/<locale>.md)
# and then for docs/<Node>.md, which is what this pack ships: the first request's 404 is the
# frontend's probe (in either renderer), not a failure of ours.
LOCALE_PROBE = re.compile(r"/extensions/[^/]+/docs/Dev2Pro\w+/[A-Za-z_-]+\.md$")


def ours(page) -> list:
    return [m for m in page.console.ours()
            if not (m[0] == "error" and " 404 " in m[1] and LOCALE_PROBE.search(m[2]))]


@pytest.fixture(scope="module")
def vue_page(comfy, context):
    """A page of its own with the Vue node renderer on (and off again afterwards)."""
    page = open_comfy(context, comfy.url)
    install_helpers(page)
    page.evaluate("(id) => __t.setting(id, true)", VUE_SETTING)
    page.wait_for_timeout(500)
    try:
        yield page
    finally:
        try:
            install_helpers(page)
            page.evaluate("(id) => __t.setting(id, false)", VUE_SETTING)
        finally:
            from .conftest import ARTIFACTS
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "vue_console.txt").write_text(page.console.text())
            page.close()


@pytest.fixture(autouse=True)
def nothing_of_ours_in_the_console(request):
    yield
    if "vue_page" in request.fixturenames:
        found = ours(request.getfixturevalue("vue_page"))
        assert not found, "console errors/warnings of ours:\n" + "\n".join(map(str, found))


@pytest.fixture(scope="module")
def ab_workflow():
    return read_ab_workflow()


def test_the_vue_renderer_is_on_and_draws_our_widgets_inside_its_nodes(vue_page, ab_workflow, artifacts):
    page = vue_page
    load_workflow(page, ab_workflow, settle_ms=800)
    assert page.evaluate("(id) => __t.getSetting(id)", VUE_SETTING) is True
    assert page.evaluate("() => LiteGraph.vueNodesMode") is True
    page.wait_for_function("(n) => __t.vueCount() >= n", arg=len(ab_workflow["nodes"]), timeout=30_000)
    nodes = page.evaluate("() => __t.nodes()")
    trains = [n["id"] for n in nodes if n["type"] == TRAIN]
    compares = [n["id"] for n in nodes if n["type"] == COMPARE]
    assert trains and compares
    changed = changed_saved_values(nodes, ab_workflow, (TRAIN, COMPARE))
    assert not changed, f"our widget changed what the workflow saves on nodes {changed}"
    for node in trains:
        focus(page, node)
        c = page.evaluate("(id) => __t.chart(id)", node)
        print("chart", node, c)
        assert c["inVueNode"], f"the loss chart is not inside Vue node {node}: {c}"
        assert c["canvas"]["width"] >= 200 and c["canvas"]["height"] >= 100, f"the chart is collapsed: {c}"
        assert c["visible"], f"something covers the loss chart: {c}"
        # Empty ("Not trained yet" and a hint) or the runs an earlier test left in this browser.
        assert c["inked"] > 0, f"the chart drew nothing (not even its empty text): {c}"
        assert c["status"], c
    node_shot(page, artifacts / "vue_loss_chart_empty.png", trains[0])
    focus(page, compares[0])
    c = page.evaluate("(id) => __t.compare(id)", compares[0])
    print("compare", compares[0], c)
    assert c["inVueNode"], f"the A/B widget is not inside Vue node {compares[0]}: {c}"
    assert c["box"]["width"] >= 200 and c["box"]["height"] >= 150, f"the A/B widget is collapsed: {c}"
    node_shot(page, artifacts / "vue_compare_empty.png", compares[0])


@pytest.fixture(scope="module")
def ab_live(comfy, vue_page, ab_workflow, artifacts):
    """The A/B example queued from the page (Vue renderer on), watched while it runs."""
    page = vue_page
    load_workflow(page, ab_workflow, settle_ms=800)
    prompt = small_prompt(comfy, ab_workflow, STEPS)
    first, second = (int(k) for k in nodes_of(prompt, TRAIN))
    for key in nodes_of(prompt, TRAIN):   # run folders of their own (the classic tests trained "ab/...")
        prompt[key]["inputs"]["name"] = "vue/" + prompt[key]["inputs"]["name"]
    focus(page, first)
    _, entry, samples = queue_and_watch(page, comfy, prompt, lambda: page.evaluate("(id) => __t.chart(id)", first))
    page.wait_for_timeout(800)
    return {"entry": entry, "samples": samples, "first": first, "second": second,
            "compare": int(nodes_of(prompt, COMPARE)[0])}


def test_loss_chart_gains_points_and_draws_them(vue_page, ab_live, artifacts):
    page = vue_page
    running = [s for s in ab_live["samples"] if s["state"] == "running"]
    assert running, f"the chart never showed a running run: {ab_live['samples'][-3:]}"
    counts = [s["points"] for s in running]
    assert counts == sorted(counts) and any(0 < n < STEPS for n in counts), counts
    for node in (ab_live["first"], ab_live["second"]):
        focus(page, node)
        c = page.evaluate("(id) => __t.chart(id)", node)
        assert c["state"] == "done" and c["points"] == STEPS and c["runs"] == 2, c
        assert c["inVueNode"] and c["visible"], c
        assert c["canvas"]["height"] >= 100 and c["inked"] > 500, f"no curve drawn: {c}"
    node_shot(page, artifacts / "vue_loss_chart_done.png", ab_live["second"])


def test_compare_widget_shows_both_images_and_the_split_follows_a_drag(vue_page, ab_live, artifacts):
    page = vue_page
    node = ab_live["compare"]
    expected = ab_live["entry"]["outputs"][str(node)]["dev2pro_compare"]
    focus(page, node)
    page.wait_for_function("(id) => { const c = __t.compare(id); return c && c.count >= 1 && c.loadedA && c.loadedB; }",
                           arg=node, timeout=30_000)
    page.wait_for_timeout(500)
    c = page.evaluate("(id) => __t.compare(id)", node)
    print("compare after run", c)
    node_shot(page, artifacts / "vue_compare_widget.png", node)
    assert c["count"] == len(expected)
    assert expected[0]["a"]["filename"] in c["srcA"] and expected[0]["b"]["filename"] in c["srcB"]
    assert c["labelA"] == expected[0]["label_a"] and c["labelB"] == expected[0]["label_b"]
    assert c["inVueNode"], c
    assert c["frame"]["width"] >= 100 and c["frame"]["height"] >= 100, f"the images have no room: {c}"
    assert c["frameVisible"], f"something covers the A/B images: {c}"
    shown = [b for b in c["previews"] if b["width"] > 0 and b["height"] > 0]
    assert not shown, f"the node also shows its grid preview (a second copy, growing the node): {c}"
    assert c["box"]["y"] + c["box"]["height"] <= c["node"]["y"] + c["node"]["height"] + 1, \
        f"the A/B widget sticks out of its node: {c}"

    before = page.evaluate("(id) => __t.node(id).pos.slice()", node)
    drag(page, c["frame"], 0.7, 0.2)
    page.wait_for_timeout(300)
    after = page.evaluate("(id) => __t.compare(id)", node)
    assert after["split"] == pytest.approx(0.2, abs=0.03), after
    assert page.evaluate("(id) => __t.node(id).pos.slice()", node) == before, "the drag moved the node"
    node_shot(page, artifacts / "vue_compare_dragged.png", node)
    page.locator(f'[data-node-id="{node}"] .dev2pro-mode[data-mode=b]').click()
    assert page.evaluate("(id) => __t.compare(id).mode", node) == "b"
    page.locator(f'[data-node-id="{node}"] .dev2pro-mode[data-mode=split]').click()
    assert page.evaluate("(id) => __t.compare(id).mode", node) == "split"


def test_node_help_page_opens_from_the_node(vue_page, ab_live, artifacts):
    page = vue_page
    node = ab_live["first"]
    focus(page, node, 0.5)   # the whole (tall) node on screen
    title = page.locator(f'[data-node-id="{node}"] [data-testid="node-title"], [data-node-id="{node}"] .lg-node-header').first
    title.click(button="right")
    page.wait_for_timeout(400)
    page.get_by_text("Node Info", exact=True).first.click()
    page.get_by_text("guidance-distilled").first.wait_for(state="visible", timeout=15_000)
    page.screenshot(path=str(artifacts / "vue_node_help.png"))
    page.keyboard.press("Escape")


def test_runs_survive_a_reload_and_switching_back_to_the_classic_renderer(vue_page, ab_live, artifacts):
    page = vue_page
    page.reload(wait_until="domcontentloaded")
    wait_for_app(page)
    close_dialogs(page)
    install_helpers(page)
    assert page.evaluate("(id) => __t.getSetting(id)", VUE_SETTING) is True
    ids = [ab_live["first"], ab_live["second"]]
    page.wait_for_function("(ids) => ids.every(id => __t.chart(id)?.points > 0) && __t.vueCount() > 0",
                           arg=ids, timeout=30_000)
    for node in ids:
        focus(page, node)
        c = page.evaluate("(id) => __t.chart(id)", node)
        assert c["state"] == "done" and c["points"] == STEPS and c["inVueNode"] and c["inked"] > 500, c
    focus(page, ab_live["compare"])
    page.wait_for_function("(id) => __t.compare(id)?.loadedA && __t.compare(id)?.loadedB",
                           arg=ab_live["compare"], timeout=30_000)
    page.wait_for_timeout(300)
    c = page.evaluate("(id) => __t.compare(id)", ab_live["compare"])
    assert c["inVueNode"] and c["frame"]["height"] >= 100 and c["frameVisible"], c

    # Back to the classic renderer in the same page: our DOM widgets go back on the canvas.
    page.evaluate("(id) => __t.setting(id, false)", VUE_SETTING)
    page.wait_for_timeout(1000)
    assert page.evaluate("() => LiteGraph.vueNodesMode") is False
    focus(page, ab_live["first"])
    c = page.evaluate("(id) => __t.chart(id)", ab_live["first"])
    assert c["connected"] and c["canvas"]["height"] >= 100 and c["inked"] > 500 and c["visible"], c
    focus(page, ab_live["compare"])
    c = page.evaluate("(id) => __t.compare(id)", ab_live["compare"])
    assert c["connected"] and c["frame"]["height"] >= 100 and c["frameVisible"], c
    page.screenshot(path=str(artifacts / "vue_back_to_classic.png"))
