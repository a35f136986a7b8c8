// Dev2Pro frontend extension: a live loss chart on Dev2ProTrainLoRA and an A/B compare
// widget on Dev2ProCompareGrid.
//
// Protocol (the nodes send, this file receives):
//  - ws "dev2pro.progress" {node, run, step, total, loss, lr, seconds (of that step), eta_seconds};
//  - the train node's executed ui {"dev2pro_losses": [{run, losses, base, variant, guidance}]};
//  - the compare node's executed ui {"images": [...grid...],
//      "dev2pro_compare": [{prompt, a: {filename, subfolder, type}, b: {...}, label_a, label_b, seed, strength}]}.
// Runs and pairs are kept in localStorage and re-read from /history after a page reload.
// Anything that fails here leaves the node as it is (its plain image outputs still show).

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { LossChart, PALETTE, formatDuration, formatLoss } from "./dev2pro_chart.js";
import { CompareView } from "./dev2pro_compare.js";
import { injectStyle } from "./dev2pro_style.js";

const TRAIN_NODE = "Dev2ProTrainLoRA";
const COMPARE_NODE = "Dev2ProCompareGrid";
const LOSS_KEY = "dev2pro.lossRuns.v1";
const COMPARE_KEY = "dev2pro.comparePairs.v1";
const KEEP_RUNS = 16;
const KEEP_POINTS = 50000;
const KEEP_PAIRS = 24;

function report(what, error) {
  // Only reached when something is broken: say so once per kind, keep the node usable.
  if (report.seen.has(what)) return;
  report.seen.add(what);
  console.warn(`[dev2pro] ${what}; the node keeps its plain outputs.`, error);
}
report.seen = new Set();

function guarded(what, fn) {
  return function (...args) {
    try {
      return fn.apply(this, args);
    } catch (error) {
      report(what, error);
    }
  };
}

// ---------------------------------------------------------------- graph helpers

function rootGraph() {
  try {
    return app.rootGraph ?? null;
  } catch (_) {
    return null;
  }
}

function graphId(graph = rootGraph()) {
  return graph?.id ? String(graph.id) : "";
}

/** The id the server names a node by: "12", or "5:12" inside subgraph node 5. */
function executionId(node) {
  const root = node?.graph?.rootGraph ?? rootGraph();
  if (!node || node.id == null || node.id === -1) return null;
  if (!node.graph || node.graph === root) return String(node.id);
  const path = [node.id];
  let graph = node.graph;
  for (let depth = 0; graph && graph !== root && depth < 16; depth++) {
    const parent = findSubgraphNode(root, graph);
    if (!parent) return null;
    path.unshift(parent.node.id);
    graph = parent.graph;
  }
  return path.join(":");
}

function findSubgraphNode(graph, target, depth = 0) {
  for (const n of graph?._nodes ?? graph?.nodes ?? []) {
    if (n.subgraph === target) return { node: n, graph };
    if (n.subgraph && depth < 16) {
      const hit = findSubgraphNode(n.subgraph, target, depth + 1);
      if (hit) return hit;
    }
  }
  return null;
}

// ---------------------------------------------------------------- storage

function load(key) {
  try {
    return JSON.parse(localStorage.getItem(key) || "null");
  } catch (_) {
    return null;
  }
}

function save(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (_) {
    // Full or disabled storage: the chart still works for this page.
  }
}

// ---------------------------------------------------------------- loss runs

/** The run of `runs` that started last, or null. */
function newest(runs) {
  let best = null;
  for (const r of runs) if (!best || r.started > best.started) best = r;
  return best;
}

/** run: {key, graph, node, run, session, started, updated, points: [[step, loss]], total,
 *        seconds (of the last step), eta, lr, live, done, base, variant, guidance} */
const lossStore = {
  runs: [],
  session: null, // the queue session live runs belong to
  queueIdle: true,
  saveTimer: null,

  restore() {
    const saved = load(LOSS_KEY);
    if (Array.isArray(saved?.runs)) {
      this.runs = saved.runs.filter((r) => r && Array.isArray(r.points));
      // Anything that was still running when the page went away is not running now
      // unless new progress arrives for it.
      for (const r of this.runs) r.live = false;
    }
    if (saved?.session) this.session = saved.session;
  },

  persist(now = false) {
    const write = () => {
      this.saveTimer = null;
      const runs = [...this.runs].sort((a, b) => b.updated - a.updated).slice(0, KEEP_RUNS);
      this.runs = this.runs.filter((r) => runs.includes(r));
      save(LOSS_KEY, {
        session: this.session,
        runs: runs.map((r) => ({ ...r, live: undefined, points: r.points.slice(-KEEP_POINTS) })),
      });
    };
    if (now) {
      clearTimeout(this.saveTimer);
      write();
    } else if (!this.saveTimer) {
      this.saveTimer = setTimeout(write, 2000);
    }
  },

  newSession(id) {
    this.session = String(id ?? `s${Date.now()}`);
    return this.session;
  },

  latest(graph, node, run) {
    return newest(this.runs.filter((r) => r.graph === graph && r.node === node && r.run === run));
  },

  add(graph, node, run, session = null) {
    const now = Date.now();
    const rec = {
      key: `${graph}|${node}|${run}|${now}`, graph, node, run,
      session: session ?? this.session ?? this.newSession(), started: now, updated: now,
      points: [], total: 0, done: false,
    };
    this.runs.push(rec);
    return rec;
  },

  progress(d) {
    const node = String(d.node);
    const graph = graphId();
    const run = String(d.run ?? "run");
    const step = Number(d.step);
    const loss = Number(d.loss);
    if (!Number.isFinite(step)) return;
    let rec = this.latest(graph, node, run);
    const last = rec?.points[rec.points.length - 1];
    if (!rec || rec.done || (last && step <= last[0])) rec = this.add(graph, node, run);
    rec.points.push([step, loss]);
    rec.total = Number(d.total) || rec.total;
    rec.seconds = Number(d.seconds);
    rec.eta = Number(d.eta_seconds);
    rec.lr = Number(d.lr);
    rec.updated = Date.now();
    rec.live = true;
    this.persist();
    charts.changed();
  },

  finished(node, entries, graph = graphId(), session = null) {
    for (const e of entries || []) {
      if (!e || !Array.isArray(e.losses)) continue;
      const run = String(e.run ?? "run");
      let rec = this.latest(graph, node, run);
      if (session !== null && rec) continue; // restoring from history: what we hold is as good
      if (!rec || (rec.done && session === null && rec.points.length !== e.losses.length)) {
        rec = this.add(graph, node, run, session);
      }
      const lastLive = rec.points.length ? rec.points[rec.points.length - 1][0] : e.losses.length;
      const offset = Math.max(0, lastLive - e.losses.length);
      rec.points = e.losses.map((v, i) => [offset + i + 1, Number(v)]);
      rec.total = Math.max(rec.total || 0, offset + e.losses.length);
      rec.done = true;
      rec.live = false;
      rec.eta = 0;
      rec.base = e.base;
      rec.variant = e.variant;
      rec.guidance = e.guidance;
      rec.updated = Date.now();
    }
    this.persist(true);
    charts.changed();
  },
};

// ---------------------------------------------------------------- compare pairs

const compareStore = {
  pairs: {}, // "graph|node" -> {pairs, updated}
  restore() {
    const saved = load(COMPARE_KEY);
    if (saved && typeof saved === "object") this.pairs = saved;
  },
  set(graph, node, pairs, fromHistory = false) {
    const key = `${graph}|${node}`;
    if (fromHistory && this.pairs[key]) return;
    this.pairs[key] = { pairs, updated: Date.now() };
    const keep = Object.entries(this.pairs).sort((a, b) => b[1].updated - a[1].updated).slice(0, KEEP_PAIRS);
    this.pairs = Object.fromEntries(keep);
    save(COMPARE_KEY, this.pairs);
    charts.changed();
  },
  get(graph, node) {
    return this.pairs[`${graph}|${node}`]?.pairs ?? this.pairs[`*|${node}`]?.pairs ?? null;
  },
};

// ---------------------------------------------------------------- widgets

const charts = {
  widgets: new Set(),
  frame: 0,
  changed() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      for (const w of this.widgets) {
        try {
          w.refresh();
        } catch (error) {
          report("a Dev2Pro widget failed to draw", error);
        }
      }
    });
  },
};

function runLabel(r) {
  const bits = [r.run];
  if (r.base) bits.push(r.variant ? `${r.base} (${r.variant})` : String(r.base));
  if (r.guidance !== undefined && r.guidance !== null) bits.push(`g ${r.guidance}`);
  return bits.join(" · ");
}

class LossChartWidget {
  constructor(node) {
    this.node = node;
    this.showAll = true;
    const root = (this.element = document.createElement("div"));
    root.className = "dev2pro-loss";
    const head = document.createElement("div");
    head.className = "dev2pro-loss-head";
    this.status = document.createElement("span");
    this.status.className = "dev2pro-loss-status";
    const toggle = document.createElement("label");
    toggle.className = "dev2pro-loss-toggle";
    toggle.title = "Also draw the other runs of the same queue";
    this.allBox = document.createElement("input");
    this.allBox.type = "checkbox";
    this.allBox.checked = true;
    this.allBox.addEventListener("change", () => {
      this.showAll = this.allBox.checked;
      this.refresh();
    });
    toggle.append(this.allBox, document.createTextNode(" all runs"));
    head.append(this.status, toggle);
    this.canvas = document.createElement("canvas");
    this.canvas.className = "dev2pro-loss-canvas";
    root.append(head, this.canvas);
    this.chart = new LossChart(this.canvas);
    this.canvas.addEventListener("pointermove", (e) => {
      this.chart.hoverX = e.clientX - this.canvas.getBoundingClientRect().left;
      this.chart.draw();
    });
    this.canvas.addEventListener("pointerleave", () => {
      this.chart.hoverX = null;
      this.chart.draw();
    });
    this.resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.chart.draw()) : null;
    this.resizeObserver?.observe(this.canvas);
  }

  destroy() {
    this.resizeObserver?.disconnect();
  }

  refresh() {
    const id = executionId(this.node);
    const graph = graphId(this.node.graph?.rootGraph);
    const sameGraph = (r) => r.graph === graph || r.graph === "*";
    const latest = id === null ? null : newest(lossStore.runs.filter((r) => sameGraph(r) && r.node === id));
    let shown = [];
    if (latest) {
      const session = lossStore.runs
        .filter((r) => sameGraph(r) && r.session === latest.session)
        .sort((a, b) => a.started - b.started);
      shown = session
        .filter((r) => this.showAll || r.node === id)
        .map((r) => ({
          key: r.key,
          label: runLabel(r),
          color: PALETTE[session.indexOf(r) % PALETTE.length],
          points: r.points,
          total: r.total,
          own: r.node === id,
        }));
    }
    this.chart.setRuns(shown);
    this.chart.draw();
    // The latest run is always among those shown: its smoothed curve is the chart's.
    const smoothed = this.chart.runs.find((r) => r.key === latest?.key)?.smoothed ?? [];
    this.status.textContent = latest ? statusText(latest, smoothed[smoothed.length - 1]) : "Not trained yet";
    this.status.title = latest ? `${runLabel(latest)}: ${this.status.textContent}` : "";
    const ownShown = shown.filter((r) => r.own);
    this.element.dataset.points = String(ownShown.reduce((n, r) => n + r.points.length, 0));
    this.element.dataset.runs = String(shown.length);
    this.element.dataset.state = latest ? (latest.done ? "done" : latest.live ? "running" : "stopped") : "empty";
  }
}

function statusText(r, smoothed) {
  const last = r.points[r.points.length - 1];
  const step = last ? last[0] : 0;
  const total = r.total ? `/${r.total}` : "";
  if (r.done) return `done, ${step} steps · smoothed loss ${formatLoss(smoothed)}`;
  if (!r.live) return `stopped at step ${step}${total} · smoothed loss ${formatLoss(smoothed)}`;
  // "seconds" is the duration of the last step.
  const rate = Number.isFinite(r.seconds) && r.seconds > 0 ? ` · ${r.seconds.toFixed(2)} s/step` : "";
  const eta = Number.isFinite(r.eta) ? ` · ETA ${formatDuration(r.eta)}` : "";
  return `step ${step}${total} · loss ${formatLoss(last?.[1])} (smoothed ${formatLoss(smoothed)})${eta}${rate}`;
}

class CompareWidget {
  constructor(node) {
    this.node = node;
    this.view = new CompareView((ref) => {
      const q = new URLSearchParams({ filename: ref.filename ?? "", subfolder: ref.subfolder ?? "", type: ref.type ?? "temp" });
      return api.apiURL(`/view?${q}`);
    });
    this.element = this.view.element;
    this.shown = null;
  }

  destroy() {
    this.view.destroy();
  }

  refresh() {
    const id = executionId(this.node);
    if (id === null) return;
    const pairs = compareStore.get(graphId(this.node.graph?.rootGraph), id);
    if (pairs && pairs !== this.shown) {
      this.shown = pairs;
      this.view.setPairs(pairs);
      // Make sure the node is at least as tall as its widgets need (ComfyUI's own grid
      // preview is hidden on this node, see hideNativePreview).
      this.fit();
      setTimeout(() => this.fit(), 250);
    }
  }

  fit() {
    try {
      const need = this.node.computeSize?.();
      if (need && this.node.size[1] < need[1]) {
        this.node.setSize([Math.max(this.node.size[0], need[0]), need[1]]);
        this.node.setDirtyCanvas?.(true, true);
      }
    } catch (_) { /* sizing is cosmetic */ }
  }
}

function attach(node, name, Widget, minHeight, minWidth) {
  const controller = new Widget(node);
  const widget = node.addDOMWidget(name, name, controller.element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => minHeight,
  });
  widget.serialize = false; // the option above keeps it out of the prompt, this out of widgets_values
  widget.dev2pro = controller;
  charts.widgets.add(controller);
  const onRemoved = node.onRemoved;
  node.onRemoved = function (...args) {
    charts.widgets.delete(controller);
    try {
      controller.destroy();
    } catch (_) { /* already gone */ }
    return onRemoved?.apply(this, args);
  };
  const size = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size?.[0] ?? 0, minWidth), Math.max(node.size?.[1] ?? 0, size[1])]);
  charts.changed();
  return controller;
}

const NATIVE_PREVIEW = "$$canvas-image-preview";

/** Hide ComfyUI's canvas image preview on a node that carries our A/B widget (called right
 *  after the frontend's onDrawBackground added it, so it is never laid out or drawn). */
function hideNativePreview(node) {
  if (!node.dev2pro || !node.widgets) return; // no A/B widget: keep ComfyUI's own preview
  for (const w of node.widgets) {
    if (w.name === NATIVE_PREVIEW && !w.hidden) {
      w.hidden = true;
      w.computedHeight = 0;
      node.setDirtyCanvas?.(true, true);
    }
  }
}

// ---------------------------------------------------------------- history (page reload)

let historyLoaded = false;

async function restoreFromHistory() {
  if (historyLoaded) return;
  historyLoaded = true;
  const res = await api.fetchApi("/history?max_items=64");
  if (!res.ok) return;
  const history = await res.json();
  const entries = Object.entries(history || {})
    .map(([id, e]) => ({ id, e, number: Number(e?.prompt?.[0] ?? 0) }))
    .sort((a, b) => b.number - a.number); // newest first
  const seen = new Set();
  for (const { id: promptId, e } of entries) {
    const prompt = e?.prompt?.[2] ?? {};
    const wf = e?.prompt?.[3]?.extra_pnginfo?.workflow?.id;
    const graph = wf ? String(wf) : "*";
    for (const [nodeId, out] of Object.entries(e?.outputs ?? {})) {
      const key = `${graph}|${nodeId}`;
      if (seen.has(key)) continue; // only the newest run of each node
      const cls = prompt?.[nodeId]?.class_type;
      if (Array.isArray(out?.dev2pro_losses) && (!cls || cls === TRAIN_NODE)) {
        seen.add(key);
        lossStore.finished(nodeId, out.dev2pro_losses, graph, `h:${promptId}`);
      }
      if (Array.isArray(out?.dev2pro_compare) && (!cls || cls === COMPARE_NODE)) {
        seen.add(key);
        compareStore.set(graph, nodeId, out.dev2pro_compare, true);
      }
    }
  }
}

// ---------------------------------------------------------------- wiring

guarded("could not restore saved Dev2Pro runs", () => {
  lossStore.restore();
  compareStore.restore();
})();

// Listen at import time, before the socket can deliver a run already in progress.
guarded("could not listen for Dev2Pro events", () => {
  api.addEventListener("dev2pro.progress", guarded("a dev2pro.progress message could not be shown", (e) => {
    if (e?.detail) lossStore.progress(e.detail);
  }));
  api.addEventListener("execution_start", guarded("execution_start", (e) => {
    if (lossStore.queueIdle || !lossStore.session) lossStore.newSession(e?.detail?.prompt_id);
    lossStore.queueIdle = false;
  }));
  api.addEventListener("status", guarded("status", (e) => {
    const remaining = e?.detail?.exec_info?.queue_remaining; // detail = the status message's "status"
    if (remaining === 0) {
      lossStore.queueIdle = true;
      const live = lossStore.runs.filter((r) => r.live);
      for (const r of live) r.live = false;
      if (live.length) {
        lossStore.persist(true);
        charts.changed();
      }
    }
  }));
})();

app.registerExtension({
  name: "dev2pro.LoraTrainer",

  async setup() {
    try {
      injectStyle();
      await restoreFromHistory();
    } catch (error) {
      report("could not read earlier Dev2Pro runs from /history", error);
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const name = nodeData?.name;
    if (name !== TRAIN_NODE && name !== COMPARE_NODE) return;
    const proto = nodeType.prototype;
    const isTrain = name === TRAIN_NODE;

    const onNodeCreated = proto.onNodeCreated;
    proto.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      try {
        injectStyle();
        this.dev2pro = isTrain
          ? attach(this, "dev2pro_loss_chart", LossChartWidget, 200, 420)
          : attach(this, "dev2pro_compare", CompareWidget, 320, 420);
      } catch (error) {
        report(`the ${isTrain ? "loss chart" : "A/B compare"} widget could not be added`, error);
      }
      return result;
    };

    const onExecuted = proto.onExecuted;
    proto.onExecuted = function (output, ...rest) {
      const result = onExecuted?.apply(this, [output, ...rest]);
      try {
        const id = executionId(this);
        if (id !== null && isTrain && Array.isArray(output?.dev2pro_losses)) {
          lossStore.finished(id, output.dev2pro_losses, graphId(this.graph?.rootGraph));
        }
        if (id !== null && !isTrain && Array.isArray(output?.dev2pro_compare)) {
          compareStore.set(graphId(this.graph?.rootGraph), id, output.dev2pro_compare);
        }
      } catch (error) {
        report("an executed result could not be shown", error);
      }
      return result;
    };

    if (!isTrain) {
      // ComfyUI 1.35.9 shows a node's executed ui "images" as a canvas widget
      // ("$$canvas-image-preview", minHeight 220) that it appends after our DOM widget from
      // onDrawBackground (updatePreviews) and draws in a deferred pass after every node.
      // The grid it would show is the same content as our A/B view (and is the node's grid
      // output, shown by the Save Image node it feeds), so while our widget is on the node
      // the preview is hidden: no overlap, no second copy, no 220 px growth after each run.
      // node.imgs stays set, so "Open Image" / "Save Image" in the node's menu still work.
      const onDrawBackground = proto.onDrawBackground;
      proto.onDrawBackground = function (...args) {
        const result = onDrawBackground?.apply(this, args);
        try {
          hideNativePreview(this);
        } catch (error) {
          report("the grid preview could not be hidden behind the A/B widget", error);
        }
        return result;
      };
    }

    const onConfigure = proto.onConfigure;
    proto.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      charts.changed(); // the node has its saved id now
      return result;
    };
  },

  async afterConfigureGraph() {
    charts.changed();
  },
});

// For tests and debugging: the live stores (read-only use).
window.__dev2pro = { lossStore, compareStore, charts };
