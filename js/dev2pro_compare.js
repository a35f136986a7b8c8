// A/B compare view for the Dev2Pro compare node: two images of a pair overlaid with a
// draggable split, a Split / A / B toggle, labels, and arrows + a list to move between
// prompts. Plain DOM, no ComfyUI imports (tests/browser/test_units.py drives it alone).
//
//   const view = new CompareView(urlOf);       // urlOf({filename, subfolder, type}) -> URL
//   parent.append(view.element);
//   view.setPairs([{prompt, a, b, label_a, label_b, seed, strength}, ...]);

const MODES = ["split", "a", "b"];

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = text;
  return e;
}

function short(text, n) {
  text = String(text ?? "");
  return text.length > n ? text.slice(0, n - 1) + "…" : text;
}

export class CompareView {
  constructor(urlOf) {
    this.urlOf = urlOf;
    this.pairs = [];
    this.index = 0;
    this.split = 0.5;
    this.mode = "split";
    this.natural = null; // [w, h] of the current A image

    const root = (this.element = el("div", "dev2pro-compare"));
    root.tabIndex = 0;

    const bar = el("div", "dev2pro-compare-bar");
    this.prevButton = el("button", "dev2pro-btn dev2pro-prev", "◀");
    this.prevButton.title = "Previous prompt (←)";
    this.select = el("select", "dev2pro-select");
    this.select.title = "Prompt";
    this.nextButton = el("button", "dev2pro-btn dev2pro-next", "▶");
    this.nextButton.title = "Next prompt (→)";
    const modes = el("div", "dev2pro-modes");
    this.modeButtons = {};
    for (const [mode, text, title] of [["split", "A|B", "Split view: drag to move the split"],
                                       ["a", "A", "Show A only (space toggles)"],
                                       ["b", "B", "Show B only (space toggles)"]]) {
      const b = el("button", "dev2pro-btn dev2pro-mode", text);
      b.dataset.mode = mode;
      b.title = title;
      b.addEventListener("click", () => this.setMode(mode));
      this.modeButtons[mode] = b;
      modes.append(b);
    }
    bar.append(this.prevButton, this.select, this.nextButton, modes);

    const stage = (this.stage = el("div", "dev2pro-compare-stage"));
    const frame = (this.frame = el("div", "dev2pro-compare-frame"));
    this.imgB = el("img", "dev2pro-img dev2pro-img-b");
    this.imgA = el("img", "dev2pro-img dev2pro-img-a");
    for (const img of [this.imgA, this.imgB]) {
      img.draggable = false;
      img.alt = "";
      img.addEventListener("error", () => this._imageError(img));
    }
    this.imgA.addEventListener("load", () => {
      this.natural = [this.imgA.naturalWidth, this.imgA.naturalHeight];
      this.layout();
    });
    this.handle = el("div", "dev2pro-split");
    this.handle.append(el("div", "dev2pro-split-knob"));
    this.labelA = el("div", "dev2pro-label dev2pro-label-a");
    this.labelB = el("div", "dev2pro-label dev2pro-label-b");
    frame.append(this.imgB, this.imgA, this.handle, this.labelA, this.labelB);
    this.empty = el("div", "dev2pro-empty", "A/B pairs appear here after the node runs.");
    stage.append(frame, this.empty);

    this.caption = el("div", "dev2pro-compare-caption");
    root.append(bar, stage, this.caption);

    this.prevButton.addEventListener("click", () => this.show(this.index - 1));
    this.nextButton.addEventListener("click", () => this.show(this.index + 1));
    this.select.addEventListener("change", () => this.show(Number(this.select.value)));
    root.addEventListener("keydown", (e) => this._key(e));

    // Dragging the split: the pointer is captured so the drag keeps going outside the image
    // and never reaches the graph canvas underneath.
    let dragging = false;
    const move = (e) => {
      const r = this.frame.getBoundingClientRect();
      if (r.width > 0) this.setSplit((e.clientX - r.left) / r.width);
    };
    frame.addEventListener("pointerdown", (e) => {
      if (e.button !== 0) return;
      e.preventDefault();
      e.stopPropagation();
      root.focus({ preventScroll: true });
      if (this.mode !== "split") this.setMode("split");
      dragging = true;
      try {
        frame.setPointerCapture(e.pointerId);
      } catch (_) { /* synthetic events have no capturable pointer */ }
      move(e);
    });
    frame.addEventListener("pointermove", (e) => {
      if (!dragging) return;
      e.preventDefault();
      e.stopPropagation();
      move(e);
    });
    const stop = (e) => {
      if (!dragging) return;
      dragging = false;
      e.stopPropagation();
    };
    frame.addEventListener("pointerup", stop);
    frame.addEventListener("pointercancel", stop);
    frame.addEventListener("dblclick", (e) => {
      e.stopPropagation();
      this.setSplit(0.5);
    });

    this.resizeObserver = typeof ResizeObserver === "function" ? new ResizeObserver(() => this.layout()) : null;
    this.resizeObserver?.observe(stage);
    this.render();
  }

  destroy() {
    this.resizeObserver?.disconnect();
  }

  setPairs(pairs) {
    this.pairs = Array.isArray(pairs) ? pairs.filter((p) => p && p.a && p.b) : [];
    this.select.replaceChildren(
      ...this.pairs.map((p, i) => {
        const o = el("option", null, `${i + 1}/${this.pairs.length}: ${short(p.prompt, 60)}`);
        o.value = String(i);
        o.title = String(p.prompt ?? "");
        return o;
      }),
    );
    this.index = Math.min(this.index, Math.max(0, this.pairs.length - 1));
    this.render();
  }

  show(index) {
    const n = this.pairs.length;
    if (!n) return;
    this.index = ((index % n) + n) % n;
    this.render();
  }

  setMode(mode) {
    if (!MODES.includes(mode)) return;
    this.mode = mode;
    this.render();
  }

  setSplit(fraction) {
    this.split = Math.min(1, Math.max(0, fraction));
    this._applySplit();
  }

  _key(e) {
    let handled = true;
    if (e.key === "ArrowLeft") this.show(this.index - 1);
    else if (e.key === "ArrowRight") this.show(this.index + 1);
    else if (e.key === " ") this.setMode(this.mode === "a" ? "b" : "a");
    else if (e.key === "s") this.setMode("split");
    else handled = false;
    if (handled) {
      e.preventDefault();
      e.stopPropagation();
    }
  }

  _imageError(img) {
    img.dataset.failed = "1";
    this.caption.textContent = "Image no longer on the server (temp files are cleared when ComfyUI restarts): run the node again.";
  }

  render() {
    const root = this.element;
    const pair = this.pairs[this.index];
    root.dataset.count = String(this.pairs.length);
    root.dataset.index = String(this.index);
    root.dataset.mode = this.mode;
    for (const [mode, b] of Object.entries(this.modeButtons)) b.classList.toggle("dev2pro-active", mode === this.mode);
    const many = this.pairs.length > 1;
    this.prevButton.disabled = !many;
    this.nextButton.disabled = !many;
    this.select.disabled = !many;
    this.select.value = String(this.index);
    this.frame.style.display = pair ? "" : "none";
    this.empty.style.display = pair ? "none" : "";
    if (!pair) {
      this.caption.replaceChildren();
      return;
    }
    for (const [img, ref] of [[this.imgA, pair.a], [this.imgB, pair.b]]) {
      const src = this.urlOf(ref);
      if (img.dataset.src === src) continue; // same image: no reload, keep a "failed" mark
      img.dataset.src = src;
      delete img.dataset.failed;
      img.src = src;
    }
    const labelA = String(pair.label_a || "A");
    const labelB = String(pair.label_b || "B");
    for (const [label, text] of [[this.labelA, labelA], [this.labelB, labelB]]) {
      label.textContent = text;
      label.title = text;
    }
    const bits = [];
    if (pair.prompt !== undefined) bits.push(`“${pair.prompt}”`);
    if (pair.seed !== undefined) bits.push(`seed ${pair.seed}`);
    if (pair.strength !== undefined) bits.push(`strength ${pair.strength}`);
    const details = bits.join(" · ");
    this.caption.replaceChildren(
      el("div", "dev2pro-caption-line dev2pro-caption-a", labelA),
      el("div", "dev2pro-caption-line dev2pro-caption-b", labelB),
      el("div", "dev2pro-caption-line dev2pro-caption-prompt", details),
    );
    this.caption.title = `${labelA}\n${labelB}\n${details}`;
    this._applySplit();
    this.layout();
  }

  _applySplit() {
    const pct = this.mode === "split" ? this.split * 100 : this.mode === "a" ? 100 : 0;
    // A covers the left part, B shows through on the right.
    this.imgA.style.clipPath = `inset(0 ${100 - pct}% 0 0)`;
    this.handle.style.left = `${pct}%`;
    this.handle.style.display = this.mode === "split" ? "" : "none";
    this.labelA.style.visibility = this.mode === "b" ? "hidden" : "";
    this.labelB.style.visibility = this.mode === "a" ? "hidden" : "";
    this.element.dataset.split = (this.mode === "split" ? this.split : pct / 100).toFixed(3);
  }

  /** Fit the frame (both images share it) inside the stage, keeping the image's aspect. */
  layout() {
    const sw = this.stage.clientWidth;
    const sh = this.stage.clientHeight;
    if (!sw || !sh) return;
    const [iw, ih] = this.natural || [1, 1];
    const scale = Math.min(sw / iw, sh / ih);
    const w = Math.max(1, Math.floor(iw * scale));
    const h = Math.max(1, Math.floor(ih * scale));
    Object.assign(this.frame.style, {
      width: `${w}px`,
      height: `${h}px`,
      left: `${Math.floor((sw - w) / 2)}px`,
      top: `${Math.floor((sh - h) / 2)}px`,
    });
  }
}
