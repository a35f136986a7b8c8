// Styles of the Dev2Pro widgets (one <style> element, injected once). No imports, so the
// drawing code can be tested with them on a blank page.

export const CSS = `
.dev2pro-loss, .dev2pro-compare {
  --dev2pro-fg: var(--input-text, #ddd);
  --dev2pro-grid: rgba(127,127,127,0.25);
  box-sizing: border-box; width: 100%; height: 100%; display: flex; flex-direction: column;
  gap: 4px; font: 11px sans-serif; color: var(--input-text, #ddd); overflow: hidden;
  background: var(--comfy-input-bg, #222); border-radius: 6px; padding: 4px;
}
.dev2pro-loss-head { display: flex; align-items: center; gap: 6px; min-height: 16px; }
.dev2pro-loss-status { flex: 1; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.dev2pro-loss-toggle { white-space: nowrap; opacity: 0.8; cursor: pointer; display: flex; align-items: center; }
.dev2pro-loss-toggle input { margin: 0 2px 0 0; }
.dev2pro-loss-canvas { flex: 1; width: 100%; min-height: 0; display: block; }
.dev2pro-compare:focus { outline: 1px solid var(--border-color, #555); }
.dev2pro-compare-bar { display: flex; gap: 4px; align-items: center; }
.dev2pro-btn { background: var(--comfy-menu-bg, #333); color: inherit; border: 1px solid var(--border-color, #555);
  border-radius: 4px; padding: 1px 6px; cursor: pointer; font: inherit; }
.dev2pro-btn:disabled { opacity: 0.4; cursor: default; }
.dev2pro-btn.dev2pro-active { background: var(--p-primary-color, #2b6cb0); color: #fff; }
.dev2pro-select { flex: 1; min-width: 0; background: var(--comfy-menu-bg, #333); color: inherit;
  border: 1px solid var(--border-color, #555); border-radius: 4px; font: inherit; }
.dev2pro-modes { display: flex; gap: 2px; }
.dev2pro-compare-stage { position: relative; flex: 1; min-height: 0; }
.dev2pro-compare-frame { position: absolute; cursor: ew-resize; touch-action: none; user-select: none; }
.dev2pro-img { position: absolute; inset: 0; width: 100%; height: 100%; pointer-events: none; user-select: none; }
.dev2pro-split { position: absolute; top: 0; bottom: 0; width: 2px; margin-left: -1px; background: #fff;
  box-shadow: 0 0 3px rgba(0,0,0,0.8); pointer-events: none; }
.dev2pro-split-knob { position: absolute; top: 50%; left: -6px; width: 14px; height: 24px; margin-top: -12px;
  border-radius: 4px; background: #fff; box-shadow: 0 0 3px rgba(0,0,0,0.8); }
.dev2pro-label { position: absolute; top: 4px; max-width: 46%; padding: 1px 5px; border-radius: 3px;
  background: rgba(0,0,0,0.65); color: #fff; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
  pointer-events: none; }
.dev2pro-label-a { left: 4px; }
.dev2pro-label-b { right: 4px; }
.dev2pro-empty { position: absolute; inset: 0; display: flex; align-items: center; justify-content: center; opacity: 0.6; }
.dev2pro-compare-caption { opacity: 0.85; min-height: 14px; }
.dev2pro-caption-line { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
/* ComfyUI's Vue node renderer ("Nodes 2.0", Comfy.VueNodes.Enabled) puts a DOM widget's
   element in a grid row of the node (.lg-node-widget) sized to its content, instead of an
   overlay box of the widget's computed height: without a height of their own the chart would
   take its canvas's default size and the A/B stage (all absolutely placed) would collapse. */
.lg-node-widget .dev2pro-loss { height: 220px; }
.lg-node-widget .dev2pro-compare { height: 340px; }
/* There the node's executed "images" (the grid) show as the Vue node's own .image-preview under
   the widgets: hidden on the compare node, as the canvas preview is in the classic renderer
   (same content as the A/B view; the node's menu still opens and saves node.imgs). */
[data-node-id]:has(.lg-node-widget .dev2pro-compare) .image-preview { display: none; }
`;

export function injectStyle() {
  if (document.getElementById("dev2pro-style")) return;
  const style = document.createElement("style");
  style.id = "dev2pro-style";
  style.textContent = CSS;
  document.head.append(style);
}
