// Loss chart drawing for the Dev2Pro training node. Plain canvas, no ComfyUI imports,
// so it can be tested on a blank page (tests/browser/test_units.py).
//
//   const chart = new LossChart(canvasElement);
//   chart.setRuns([{ label, color, points: [[step, loss], ...], total, own: true }]);
//   chart.draw();

export const PALETTE = ["#f0883e", "#58a6ff", "#3fb950", "#d2a8ff", "#ff7b72", "#e3b341", "#39c5cf"];

/** Debiased exponential moving average (as TensorBoard smooths scalars). */
export function smooth(values, weight = 0.9) {
  const out = new Array(values.length);
  let acc = 0;
  let n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (!Number.isFinite(v)) {
      out[i] = NaN;
      continue;
    }
    n += 1;
    acc = weight * acc + (1 - weight) * v;
    out[i] = weight > 0 ? acc / (1 - Math.pow(weight, n)) : v;
  }
  return out;
}

/** About `count` round tick values covering [lo, hi]. */
export function niceTicks(lo, hi, count = 5) {
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) return [];
  if (hi <= lo) hi = lo + (Math.abs(lo) || 1) * 1e-3;
  const raw = (hi - lo) / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  const step = (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  const ticks = [];
  for (let k = Math.ceil(lo / step - 1e-9); k * step <= hi + step * 1e-9; k++) {
    ticks.push(k === 0 ? 0 : Number((k * step).toPrecision(12)));
  }
  return ticks;
}

export function formatLoss(x) {
  if (!Number.isFinite(x)) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e4)) return x.toExponential(2);
  return x.toPrecision(4).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
}

export function formatDuration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  return `${h}h ${String(m % 60).padStart(2, "0")}m`;
}

function quantile(sorted, q) {
  if (!sorted.length) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))));
  return sorted[i];
}

/** The y range shown: all smoothed values, raw values up to the 99th percentile (one spike
 *  must not flatten the curve), with a little headroom. */
export function yRange(runs) {
  const raw = [];
  let lo = Infinity;
  let hi = -Infinity;
  for (const run of runs) {
    for (const [, v] of run.points) if (Number.isFinite(v)) raw.push(v);
    for (const v of run.smoothed || []) {
      if (Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
  }
  if (!raw.length) return [0, 1];
  raw.sort((a, b) => a - b);
  lo = Math.min(lo, raw[0]);
  hi = Math.max(hi, quantile(raw, 0.99));
  if (hi - lo < 1e-12) {
    const pad = Math.abs(hi) * 0.05 || 0.05;
    return [lo - pad, hi + pad];
  }
  const pad = (hi - lo) * 0.06;
  return [lo - pad, hi + pad];
}

export class LossChart {
  constructor(canvas, { smoothing = 0.9 } = {}) {
    this.canvas = canvas;
    this.smoothing = smoothing;
    this.runs = [];
    this.hoverX = null; // css px inside the canvas, or null
    this.emptyText = "Loss appears here while the node trains.";
    this.plot = null; // last plot rectangle and scales, for hover
  }

  /** runs: [{label, color, points: [[step, loss]], total, own}] */
  setRuns(runs) {
    this.runs = runs.map((r) => ({ ...r, smoothed: smooth(r.points.map((p) => p[1]), this.smoothing) }));
  }

  draw() {
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.floor(canvas.clientWidth));
    const h = Math.max(1, Math.floor(canvas.clientHeight));
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    const style = getComputedStyle(canvas);
    const fg = style.getPropertyValue("--dev2pro-fg").trim() || "#ddd";
    const grid = style.getPropertyValue("--dev2pro-grid").trim() || "rgba(255,255,255,0.12)";
    ctx.font = "10px sans-serif";

    const runs = this.runs.filter((r) => r.points.length);
    if (!runs.length) {
      this.plot = null;
      ctx.fillStyle = fg;
      ctx.globalAlpha = 0.6;
      ctx.textAlign = "center";
      ctx.textBaseline = "middle";
      ctx.fillText(this.emptyText, w / 2, h / 2);
      ctx.globalAlpha = 1;
      return;
    }

    const [y0, y1] = yRange(runs);
    let xMax = 1;
    let xMin = Infinity;
    for (const r of runs) {
      xMax = Math.max(xMax, r.total || 0, r.points[r.points.length - 1][0]);
      xMin = Math.min(xMin, r.points[0][0]);
    }
    xMin = Math.min(xMin, 0);
    const yTicks = niceTicks(y0, y1, Math.max(2, Math.floor(h / 40)));
    const labelW = Math.max(...yTicks.map((t) => ctx.measureText(formatLoss(t)).width), 10);
    const left = Math.ceil(labelW) + 8;
    const right = w - 8;
    const top = 8;
    const bottom = h - 16;
    if (right - left < 20 || bottom - top < 20) return;
    const sx = (s) => left + ((s - xMin) / (xMax - xMin || 1)) * (right - left);
    const sy = (v) => bottom - ((v - y0) / (y1 - y0)) * (bottom - top);
    this.plot = { left, right, top, bottom, xMin, xMax, sx, sy };

    // Grid and ticks.
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.fillStyle = fg;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (const t of yTicks) {
      const y = Math.round(sy(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(left, y);
      ctx.lineTo(right, y);
      ctx.stroke();
      ctx.fillText(formatLoss(t), left - 4, y);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (const t of niceTicks(xMin, xMax, Math.max(2, Math.floor((right - left) / 70)))) {
      if (!Number.isInteger(t)) continue;
      const x = Math.round(sx(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(x, bottom);
      ctx.lineTo(x, bottom + 3);
      ctx.stroke();
      ctx.fillText(String(t), x, bottom + 4);
    }
    ctx.strokeRect(left + 0.5, top + 0.5, right - left, bottom - top);

    // Curves: others first, own runs on top; raw faint, smoothed bold.
    ctx.save();
    ctx.beginPath();
    ctx.rect(left, top, right - left, bottom - top);
    ctx.clip();
    const ordered = [...runs].sort((a, b) => (a.own ? 1 : 0) - (b.own ? 1 : 0));
    for (const run of ordered) {
      const steps = run.points.map((p) => p[0]);
      ctx.strokeStyle = run.color;
      ctx.globalAlpha = run.own ? 0.28 : 0.14;
      ctx.lineWidth = 1;
      this._line(ctx, steps, run.points.map((p) => p[1]), sx, sy, right - left);
      ctx.globalAlpha = run.own ? 1 : 0.75;
      ctx.lineWidth = run.own ? 2 : 1.5;
      this._line(ctx, steps, run.smoothed, sx, sy, right - left);
    }
    ctx.restore();
    ctx.globalAlpha = 1;

    // Legend when several runs are shown.
    if (runs.length > 1) {
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      let y = top + 4;
      for (const run of runs) {
        const text = run.label;
        const tw = ctx.measureText(text).width;
        const x = right - tw - 22;
        ctx.fillStyle = "rgba(0,0,0,0.45)";
        ctx.fillRect(x - 3, y - 1, tw + 22, 13);
        ctx.fillStyle = run.color;
        ctx.fillRect(x, y + 4, 12, 3);
        ctx.fillStyle = fg;
        ctx.fillText(text, x + 16, y);
        y += 14;
      }
    }

    // Hover read-out.
    if (this.hoverX !== null && this.hoverX >= left && this.hoverX <= right) {
      const step = Math.round(xMin + ((this.hoverX - left) / (right - left)) * (xMax - xMin));
      const lines = [];
      for (const run of runs) {
        const i = nearestIndex(run.points, step);
        if (i < 0) continue;
        const [s, v] = run.points[i];
        lines.push({ color: run.color, text: `${runs.length > 1 ? run.label + " " : ""}step ${s}: ${formatLoss(v)} (smoothed ${formatLoss(run.smoothed[i])})` });
      }
      const x = Math.round(sx(step)) + 0.5;
      ctx.strokeStyle = fg;
      ctx.globalAlpha = 0.5;
      ctx.beginPath();
      ctx.moveTo(x, top);
      ctx.lineTo(x, bottom);
      ctx.stroke();
      ctx.globalAlpha = 1;
      ctx.textAlign = "left";
      ctx.textBaseline = "top";
      const tw = Math.max(...lines.map((l) => ctx.measureText(l.text).width), 0);
      let bx = x + 6;
      if (bx + tw + 8 > right) bx = x - tw - 14;
      let by = bottom - 14 * lines.length - 6;
      ctx.fillStyle = "rgba(0,0,0,0.7)";
      ctx.fillRect(bx, by - 2, tw + 8, 14 * lines.length + 2);
      for (const l of lines) {
        ctx.fillStyle = l.color;
        ctx.fillText(l.text, bx + 4, by);
        by += 14;
      }
    }
  }

  /** Polyline of (xs, ys); above ~2 points per pixel it draws the min/max per pixel column. */
  _line(ctx, xs, ys, sx, sy, widthPx) {
    ctx.beginPath();
    let started = false;
    if (xs.length > widthPx * 2) {
      let col = null;
      let lo = Infinity;
      let hi = -Infinity;
      const flush = () => {
        if (col === null || lo === Infinity) return;
        if (!started) {
          ctx.moveTo(col, sy(lo));
          started = true;
        } else ctx.lineTo(col, sy(lo));
        if (hi !== lo) ctx.lineTo(col, sy(hi));
      };
      for (let i = 0; i < xs.length; i++) {
        const c = Math.round(sx(xs[i]));
        if (c !== col) {
          flush();
          col = c;
          lo = Infinity;
          hi = -Infinity;
        }
        if (Number.isFinite(ys[i])) {
          lo = Math.min(lo, ys[i]);
          hi = Math.max(hi, ys[i]);
        }
      }
      flush();
    } else {
      for (let i = 0; i < xs.length; i++) {
        if (!Number.isFinite(ys[i])) continue;
        const x = sx(xs[i]);
        const y = sy(ys[i]);
        if (!started) {
          ctx.moveTo(x, y);
          started = true;
        } else ctx.lineTo(x, y);
      }
    }
    ctx.stroke();
  }
}

function nearestIndex(points, step) {
  if (!points.length) return -1;
  let lo = 0;
  let hi = points.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] < step) lo = mid + 1;
    else hi = mid;
  }
  if (lo > 0 && Math.abs(points[lo - 1][0] - step) <= Math.abs(points[lo][0] - step)) lo -= 1;
  return lo;
}
