"""The drawing code of js/ on a blank page in headless Chromium (no ComfyUI needed):
the smoothing and tick maths, the loss chart's pixels, and the A/B view's split drag,
mode toggle and prompt navigation."""

from __future__ import annotations

import functools
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from .helpers import drag

REPO = Path(__file__).resolve().parents[2]
PAGE = """<!doctype html><html><head><meta charset="utf-8"><link rel="icon" href="data:,"><style>
#chart { width: 480px; height: 220px; display: block; }
#compare { width: 480px; height: 360px; }
</style></head><body><canvas id="chart"></canvas><div id="compare"></div></body></html>"""


def solid(color, text) -> bytes:
    img = Image.new("RGB", (256, 192), color)
    ImageDraw.Draw(img).text((110, 90), text, fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("unit-site")
    (root / "js").symlink_to(REPO / "js", target_is_directory=True)
    (root / "index.html").write_text(PAGE)
    for name, color in (("a0", (200, 30, 30)), ("b0", (30, 60, 200)), ("a1", (220, 140, 20)),
                        ("b1", (20, 160, 90)), ("a2", (120, 20, 140)), ("b2", (200, 200, 40))):
        (root / f"{name}.png").write_bytes(solid(color, name.upper()))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def page(context, site):
    page = context.new_page()
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(site + "/index.html")
    page.evaluate("async () => (await import('/js/dev2pro_style.js')).injectStyle()")
    yield page
    page.close()
    assert not errors, errors


def test_smoothing_ticks_and_formats(page):
    r = page.evaluate("""async () => {
        const m = await import('/js/dev2pro_chart.js');
        return {
            flat: m.smooth([1, 1, 1]),
            debiased: m.smooth([0, 2], 0.5),
            raw: m.smooth([3, 1, 2], 0),
            gap: m.smooth([1, NaN, 1]).map(String),
            ticks: m.niceTicks(0, 1, 5),
            ticks2: m.niceTicks(0.137, 0.142, 4),
            dur: [m.formatDuration(42), m.formatDuration(125), m.formatDuration(7300)],
            loss: [m.formatLoss(0.123456), m.formatLoss(0.00001234), m.formatLoss(2)],
        };
    }""")
    assert r["flat"] == [1, 1, 1]
    assert r["debiased"] == pytest.approx([0, 4 / 3])      # EMA 1.0 / (1 - 0.5**2)
    assert r["raw"] == [3, 1, 2]
    assert r["gap"] == ["1", "NaN", "1"]
    assert r["ticks"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert len(r["ticks2"]) >= 3 and all(0.137 <= t <= 0.142 for t in r["ticks2"])
    assert r["dur"] == ["42s", "2m 05s", "2h 01m"]
    assert r["loss"] == ["0.1235", "1.23e-5", "2"]


def test_loss_chart_draws_raw_faint_smoothed_bold_and_a_legend_for_two_runs(page, artifacts):
    counts = page.evaluate("""async () => {
        const { LossChart } = await import('/js/dev2pro_chart.js');
        const canvas = document.getElementById('chart');
        canvas.classList.add('dev2pro-loss-canvas');
        const chart = new LossChart(canvas);
        let seed = 1;
        const rnd = () => (seed = (seed * 16807) % 2147483647) / 2147483647;
        const curve = (scale) => Array.from({length: 300}, (_, i) => [i + 1, scale * (0.2 + 0.8 * Math.exp(-i / 60)) + 0.15 * (rnd() - 0.5)]);
        const count = (pred) => {
            const copy = document.createElement('canvas');
            copy.width = canvas.width;
            copy.height = canvas.height;
            const ctx = copy.getContext('2d', { willReadFrequently: true });
            ctx.drawImage(canvas, 0, 0);
            const d = ctx.getImageData(0, 0, copy.width, copy.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) if (pred(d[i], d[i + 1], d[i + 2], d[i + 3])) n++;
            return n;
        };
        const strongRed = (r, g, b, a) => a > 200 && r > 200 && g < 80 && b < 80;
        const faintRed = (r, g, b, a) => a > 10 && a < 160 && r > 150 && g < 80 && b < 80;
        chart.setRuns([]);
        chart.draw();
        const empty = count((r, g, b, a) => a > 0);
        chart.setRuns([{ label: 'a', color: '#ff0000', points: curve(1), total: 400, own: true }]);
        chart.draw();
        const one = { strong: count(strongRed), faint: count(faintRed) };
        chart.setRuns([{ label: 'ab/dev2pro_g1 · g 1', color: '#ff0000', points: curve(1), total: 400, own: true },
                       { label: 'ab/dev · g 3.5', color: '#0000ff', points: curve(1.3), total: 400, own: false }]);
        chart.draw();
        const blue = count((r, g, b, a) => a > 150 && b > 200 && r < 80 && g < 80);
        return { empty, one, blue };
    }""")
    assert counts["empty"] > 0, "the empty chart should say what it waits for"
    assert counts["one"]["strong"] > 300, "no bold smoothed curve"
    assert counts["one"]["faint"] > 300, "no faint raw curve"
    assert counts["blue"] > 100, "the second run is not drawn"
    page.locator("#chart").screenshot(path=str(artifacts / "unit_loss_chart.png"))


def _pixel(png: bytes, x: float, y: float):
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return img[int(y), int(x)].astype(int)


def _near(rgb, target, tol=40):
    return all(abs(int(a) - b) <= tol for a, b in zip(rgb, target))


def test_compare_view_split_drags_toggles_and_moves_between_prompts(page, artifacts):
    page.evaluate("""async () => {
        const { CompareView } = await import('/js/dev2pro_compare.js');
        const view = new CompareView((ref) => '/' + ref.filename);
        document.getElementById('compare').append(view.element);
        view.setPairs([0, 1, 2].map(i => ({ prompt: 'prompt ' + i, a: { filename: `a${i}.png` }, b: { filename: `b${i}.png` },
            label_a: 'A: dev2pro, guidance 1', label_b: 'B: dev, guidance 3.5', seed: 42, strength: 1 })));
        window.view = view;
    }""")
    page.wait_for_function("() => view.imgA.complete && view.imgA.naturalWidth > 0 && view.imgB.naturalWidth > 0")
    page.wait_for_timeout(100)
    root = page.locator(".dev2pro-compare")
    assert root.get_attribute("data-count") == "3"
    assert page.locator(".dev2pro-label-a").inner_text() == "A: dev2pro, guidance 1"
    assert page.locator(".dev2pro-label-b").inner_text() == "B: dev, guidance 3.5"
    assert "prompt 0" in page.locator(".dev2pro-compare-caption").inner_text()

    box = page.locator(".dev2pro-compare-frame").bounding_box()
    assert box["width"] / box["height"] == pytest.approx(256 / 192, rel=0.02), "aspect not kept"
    drag(page, box, 0.6, 0.25)
    y = box["y"] + box["height"] / 2
    assert float(root.get_attribute("data-split")) == pytest.approx(0.25, abs=0.02)
    shot = page.screenshot()
    assert _near(_pixel(shot, box["x"] + box["width"] * 0.1, y + 20), (200, 30, 30)), "A not left of the split"
    assert _near(_pixel(shot, box["x"] + box["width"] * 0.4, y + 20), (30, 60, 200)), "B not right of the split"
    page.locator("#compare").screenshot(path=str(artifacts / "unit_compare_split.png"))

    page.locator(".dev2pro-mode[data-mode=b]").click()
    assert root.get_attribute("data-mode") == "b"
    assert _near(_pixel(page.screenshot(), box["x"] + box["width"] * 0.1, y + 20), (30, 60, 200))
    page.keyboard.press(" ")   # space toggles A / B
    assert root.get_attribute("data-mode") == "a"
    assert _near(_pixel(page.screenshot(), box["x"] + box["width"] * 0.9, y + 20), (200, 30, 30))

    page.locator(".dev2pro-next").click()
    assert root.get_attribute("data-index") == "1"
    page.wait_for_function("() => view.imgA.src.endsWith('/a1.png') && view.imgA.complete")
    assert "prompt 1" in page.locator(".dev2pro-compare-caption").inner_text()
    page.keyboard.press("ArrowLeft")
    page.keyboard.press("ArrowLeft")
    assert root.get_attribute("data-index") == "2", "arrows should wrap around"
    page.locator(".dev2pro-select").select_option("0")
    assert root.get_attribute("data-index") == "0"
