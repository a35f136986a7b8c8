"""End to end on a GPU, as a user runs it: a full-size float8 Flux *file*, loaded and
trained by the headless command (the same placement and loop as the node).

    python benchmarks/load_and_train.py --work /tmp/lt --out result.json [--cli-args ...]

1. writes a random full-size Flux-dev float8 file (12 GB, the released layout) and a
   small encoded dataset, 4 samples per image size (`--sizes`, default 1024; T5 length 512);
2. runs `python -m fluxtrain.cli` on them once per setting given, recording the peak
   host RSS of each training process (its own ru_maxrss), the seconds from start to
   the first finished step, and the step times it printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fluxtrain.dataset import EncodedDatasetWriter  # noqa: E402
from fluxtrain.params import FluxParams, expected_shapes  # noqa: E402
from fluxtrain.synthetic import BIAS_STD, WEIGHT_GAIN  # noqa: E402

STEP_LINE = re.compile(r"step (\d+)/(\d+) loss ([\d.]+) lr \S+ ([\d.]+)s")


def write_full_size_fp8(path: Path, device: str = "cuda") -> None:
    """Random weights drawn on the GPU tensor by tensor, written as one float8 file."""
    from safetensors.torch import save_file

    tensors = {}
    g = torch.Generator(device=device)
    for name, shape in expected_shapes(FluxParams()).items():
        if name.endswith(".scale"):
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            continue
        g.manual_seed(zlib.crc32(name.encode()))
        value = torch.randn(shape, generator=g, device=device)
        value *= WEIGHT_GAIN / shape[1] ** 0.5 if len(shape) == 2 else BIAS_STD
        tensors[name] = value.to(torch.float8_e4m3fn).cpu()
    save_file(tensors, str(path))


def write_dataset(folder: Path, sizes: list[int], samples: int = 4) -> None:
    """`samples` encoded samples of each square pixel size in `sizes` (one bucket each)."""
    g = torch.Generator().manual_seed(0)
    with EncodedDatasetWriter(folder, resolution=max(sizes), encoders={"vae": "random", "text": "random"},
                              overwrite=True) as w:
        w.set_empty_caption(torch.randn(512, 4096, generator=g).bfloat16(), torch.randn(768, generator=g))
        for size in sizes:
            for i in range(samples):
                w.add(torch.randn(16, size // 8, size // 8, generator=g),
                      torch.randn(512, 4096, generator=g).bfloat16(), torch.randn(768, generator=g),
                      f"{size} sample {i}")


def run_cli(base: Path, data: Path, work: Path, tag: str, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "fluxtrain.cli", "--base", str(base), "--dataset", str(data),
           "--lora", str(work / f"{tag}.safetensors"), "--run-dir", str(work / f"run-{tag}"), *extra]
    began = time.monotonic()
    first_step = None
    steps = []
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        print(f"  [{tag}] {line.rstrip()}", flush=True)
        m = STEP_LINE.search(line)
        if m:
            first_step = first_step or time.monotonic() - began
            steps.append(float(m.group(4)))
    _, status, usage = os.wait4(proc.pid, 0)      # this child's own peak, not the max so far
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss_gib = usage.ru_maxrss / 2 ** 20
    timed = sorted(steps[3:]) or sorted(steps)
    return {"tag": tag, "args": extra, "exit": proc.returncode, "seconds_to_first_step": first_step,
            "median_step_s": timed[len(timed) // 2] if timed else None, "step_times": steps,
            "peak_rss_gib": rss_gib,
            "placement": next((x for x in lines if x.startswith("[fluxtrain] memory")), None),
            "graphs": [x for x in lines if "CUDA graphs" in x],
            "log_tail": lines[-8:]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--run", action="append", default=[],
                        help="TAG:ARGS, e.g. 'auto:--memory auto --steps 8' (repeatable)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024],
                        help="square image sizes of the dataset, 4 samples each (one bucket each)")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    base, data = args.work / "flux-dev2pro-fp8.safetensors", args.work / "data"
    t = time.monotonic()
    if not base.exists():
        write_full_size_fp8(base)
    write_dataset(data, args.sizes)
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "base_gb": base.stat().st_size / 1e9, "prepare_s": time.monotonic() - t, "runs": []}
    for spec in args.run:
        tag, _, rest = spec.partition(":")
        results["runs"].append(run_cli(base, data, args.work, tag, rest.split()))
        args.out.write_text(json.dumps(results, indent=1))
    for r in results["runs"]:
        print(f"{r['tag']:>10} exit {r['exit']} first step after {r['seconds_to_first_step']} s, "
              f"median {r['median_step_s']} s/step, peak RSS {r['peak_rss_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
