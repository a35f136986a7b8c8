"""Start a real ComfyUI headless, on loopback, in a throwaway base directory, and
talk to it through its HTTP API the way the frontend does.

    with ComfyServer(find_comfyui(), tmp_dir) as server:
        prompt_id = server.queue(graph)          # API-format prompt
        entry = server.wait(prompt_id, timeout=300)
        images = server.output_images(entry)

The base directory gets its own custom_nodes/ (this pack linked in), models/,
input/, output/, temp/ and user/, and the database lives in memory, so a run
leaves nothing behind in the ComfyUI checkout. The server is always killed on
exit, with its whole process group.

ComfyUI is found through COMFYUI_PATH or the custom_nodes/ folder this pack sits
in; it runs under COMFYUI_PYTHON, else <ComfyUI>/venv or .venv, else the Python
running the tests (which then needs ComfyUI's requirements).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]
PACK_NAME = "comfyui-dev2pro-lora-trainer"
MODEL_FOLDERS = ("diffusion_models", "unet", "checkpoints", "loras", "vae", "text_encoders", "clip")
HOST = "127.0.0.1"


class ComfyError(RuntimeError):
    """ComfyUI refused a prompt, failed while running it, or did not answer in time."""


class ComfyInterrupted(ComfyError):
    """The prompt stopped because someone called /interrupt."""


def find_comfyui() -> Path | None:
    """COMFYUI_PATH if set, else the ComfyUI this pack is installed in, else None."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "main.py").is_file():
            raise ComfyError(f"COMFYUI_PATH={env} has no main.py: point it at a ComfyUI checkout")
        return path
    parent = PACK_DIR.parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        return parent.parent
    return None


def comfyui_python(comfyui: Path) -> str:
    """COMFYUI_PYTHON, else a venv inside the ComfyUI checkout, else the Python running the tests."""
    env = os.environ.get("COMFYUI_PYTHON")
    if env:
        return env
    for venv in ("venv", ".venv"):
        candidate = Path(comfyui) / venv / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfyui: Path, base_dir: Path, *, python: str | None = None,
                 pack_dir: Path = PACK_DIR, startup_timeout: float = 240, extra_args=()):
        self.comfyui = Path(comfyui)
        self.base_dir = Path(base_dir)
        self.python = python or comfyui_python(self.comfyui)
        self.pack_dir = Path(pack_dir)
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.client_id = uuid.uuid4().hex
        self.log_path = self.base_dir / "comfyui.log"
        self.process: subprocess.Popen | None = None
        self.events: EventListener | None = None
        self.owns_process = True

    @classmethod
    def attach(cls, url: str) -> "ComfyServer":
        """A ComfyUI someone else runs (e.g. with the real models): the HTTP API only;
        nothing is started or stopped, and no folder of it is known here."""
        server = cls.__new__(cls)
        server.url, server.client_id = url.rstrip("/"), uuid.uuid4().hex
        server.process, server.events, server.owns_process = None, None, False
        return server

    # Folders of the throwaway base directory.
    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def pack_link(self) -> Path:
        return self.base_dir / "custom_nodes" / PACK_NAME

    def model_path(self, folder: str, name: str) -> Path:
        return self.models_dir / folder / name

    def start(self) -> "ComfyServer":
        self.launch()
        self.wait_until_up()
        return self

    def launch(self):
        """Start the process without waiting for it (boot takes ~20 s: do other work meanwhile)."""
        for sub in ("custom_nodes", "input", "output", "temp", "user",
                    *(f"models/{m}" for m in MODEL_FOLDERS)):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        if not self.pack_link.exists():
            self.pack_link.symlink_to(self.pack_dir, target_is_directory=True)
        cmd = [self.python, "main.py", "--cpu", "--listen", HOST, "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)  # the test runner's path must not shadow ComfyUI's own modules
        log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen(cmd, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                                            preexec_fn=_die_with_parent)
        finally:
            log.close()

    def wait_until_up(self):
        try:
            self._wait_until_up()
            self.events = EventListener(HOST, self.port, self.client_id)
        except BaseException:
            self.stop()
            raise

    def _wait_until_up(self):
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ComfyError(
                    f"ComfyUI exited with code {self.process.returncode} while starting "
                    f"(python {self.python}; set COMFYUI_PYTHON to a Python with ComfyUI's "
                    f"requirements installed). Log tail:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return
            except (OSError, ComfyError):
                time.sleep(0.5)
        raise ComfyError(f"ComfyUI did not answer on {self.url} within {self.startup_timeout:.0f} s. "
                         f"Log tail:\n{self.log_tail()}")

    def stop(self):
        if self.events is not None:
            self.events.close()
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # HTTP.
    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                data = resp.read()
                ctype = resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            try:
                detail = json.dumps(json.loads(detail), indent=1)
            except ValueError:
                pass
            raise ComfyError(f"{method} {path} -> HTTP {e.code}: {detail}") from None
        return json.loads(data) if "json" in ctype else data

    def get(self, path: str, timeout: float = 30):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload, timeout: float = 30):
        return self.request("POST", path, json.dumps(payload).encode(),
                            {"Content-Type": "application/json"}, timeout)

    # The API the frontend uses.
    def object_info(self, node_class: str | None = None) -> dict:
        if node_class is None:
            return self.get("/object_info", timeout=60)
        return self.get(f"/object_info/{urllib.parse.quote(node_class)}")[node_class]

    def queue(self, prompt: dict, extra_data: dict | None = None) -> str:
        """Queue an API-format prompt; a prompt ComfyUI rejects raises with its node_errors."""
        payload = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            payload["extra_data"] = extra_data
        return self.post("/prompt", payload)["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return self.get(f"/history/{prompt_id}").get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 300, poll: float = 0.5) -> dict:
        """The history entry once the prompt finished; raises with ComfyUI's error if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                if entry["status"]["status_str"] == "error":
                    interrupted = [d for e, d in entry["status"].get("messages", [])
                                   if e == "execution_interrupted"]
                    if interrupted:
                        raise ComfyInterrupted(f"prompt {prompt_id} was interrupted at node "
                                               f"{interrupted[0].get('node_id')} ({interrupted[0].get('node_type')})")
                    raise ComfyError(describe_failure(entry))
                return entry
            if self.owns_process and (self.process is None or self.process.poll() is not None):
                raise ComfyError(f"ComfyUI died while running {prompt_id}. Log tail:\n{self.log_tail()}")
            time.sleep(poll)
        self.interrupt()
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s (interrupted it). "
                         f"Log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        return self.wait(self.queue(prompt), timeout)

    def interrupt(self, prompt_id: str | None = None):
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def upload_image(self, path: Path, name: str | None = None, subfolder: str = "") -> str:
        """POST /upload/image; returns the name a LoadImage node takes."""
        name = name or Path(path).name
        boundary = uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                 f'Content-Type: application/octet-stream\r\n\r\n'.encode() + Path(path).read_bytes() + b"\r\n"]
        for field, value in (("overwrite", "true"), ("subfolder", subfolder)):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n'
                         f'{value}\r\n'.encode())
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        reply = self.request("POST", "/upload/image", body,
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return f"{reply['subfolder']}/{reply['name']}" if reply["subfolder"] else reply["name"]

    def output_images(self, entry: dict) -> list[Path]:
        """Files the SaveImage/PreviewImage nodes of a finished prompt wrote."""
        roots = {"output": self.output_dir, "temp": self.base_dir / "temp", "input": self.input_dir}
        return [roots[img["type"]] / img["subfolder"] / img["filename"]
                for out in entry.get("outputs", {}).values() for img in out.get("images", [])]

    # The log.
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def pack_import_failure(self) -> str | None:
        """The log lines where ComfyUI says it could not import this pack, or None."""
        log = self.log_text()
        if f"(IMPORT FAILED): {self.pack_link}" not in log:
            return None
        return "\n".join(line for line in log.splitlines() if PACK_NAME in line or "Error" in line)

    def log_mark(self) -> int:
        """Position in the log; `log_since(mark)` gives what a run added."""
        return len(self.log_text())

    def log_since(self, mark: int) -> str:
        return self.log_text()[mark:]


class EventListener:
    """The /ws event stream ComfyUI sends the frontend ("progress", "executing",
    "executed", and any custom event a node sends with PromptServer.send_sync),
    read by a small stdlib WebSocket client on a background thread.
    Binary frames (image previews) are dropped."""

    def __init__(self, host: str, port: int, client_id: str, timeout: float = 10):
        self.events: list[tuple[str, dict]] = []
        self._cond = threading.Condition()
        self._sock = socket.create_connection((host, port), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._sock.sendall((f"GET /ws?clientId={client_id} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self._buf = b""
        while b"\r\n\r\n" not in self._buf:
            self._buf += self._recv()
        head, self._buf = self._buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n", 1)[0]:
            raise ComfyError(f"/ws refused the WebSocket upgrade: {head[:200]!r}")
        self._sock.settimeout(None)
        self._thread = threading.Thread(target=self._read_loop, daemon=True, name="comfy-ws")
        self._thread.start()

    def _recv(self) -> bytes:
        chunk = self._sock.recv(65536)
        if not chunk:
            raise ConnectionError("ComfyUI closed the WebSocket")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._buf += self._recv()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _read_loop(self):
        message, kind = b"", None
        try:
            while True:
                b0, b1 = self._read(2)
                opcode, length = b0 & 0x0F, b1 & 0x7F
                if length == 126:
                    length = int.from_bytes(self._read(2), "big")
                elif length == 127:
                    length = int.from_bytes(self._read(8), "big")
                payload = self._read(length)  # server frames are never masked
                if opcode == 8:
                    return
                if opcode in (1, 2):
                    message, kind = payload, opcode
                elif opcode == 0:
                    message += payload
                else:
                    continue  # ping/pong: aiohttp does not require answers from us
                if b0 & 0x80 and kind == 1:
                    data = json.loads(message)
                    with self._cond:
                        self.events.append((data.get("type"), data.get("data")))
                        self._cond.notify_all()
        except (OSError, ConnectionError, ValueError):
            return

    def of_type(self, event_type: str) -> list[dict]:
        with self._cond:
            return [d for t, d in self.events if t == event_type]

    def wait_for(self, predicate, timeout: float = 60) -> tuple[str, dict]:
        """The first event (type, data) for which predicate(type, data) holds, seen or yet to come."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self.events:
                    if predicate(*event):
                        return event
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ComfyError(f"no matching WebSocket event within {timeout:.0f} s; "
                                     f"saw {[t for t, _ in self.events][-20:]}")
                self._cond.wait(left)

    def close(self):
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def _die_with_parent():
    """Linux: the server gets SIGKILL if the test process dies without cleaning up."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def lora_keys_not_loaded(log: str) -> list[str]:
    """Keys of a LoRA file ComfyUI could not map onto the model: each is a failed LoRA."""
    marker = "lora key not loaded: "
    return [line.split(marker, 1)[1].strip() for line in log.splitlines() if marker in line]


def describe_failure(entry: dict) -> str:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            trace = "".join(data.get("traceback", []))
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type')}: {data.get('exception_message')}\n{trace}")
    return f"prompt failed: {json.dumps(entry.get('status'), indent=1)}"


def copy_into(src: Path, dst: Path) -> Path:
    """Place a model file in a server folder: hard link when possible (no copy of a GB), else copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def flux_dev_graph(unet: str, clip_l: str, vae: str, *, text: str = "a red fox in the snow",
                   seed: int = 0, steps: int = 4, size: int = 128, guidance: float = 3.5,
                   loras: tuple[tuple[str, float], ...] = (), prefix: str = "flux") -> dict:
    """The standard Flux-dev sampling graph in API format, as a user wires it:
    UNETLoader -> [LoraLoaderModelOnly...] -> ModelSamplingFlux -> KSampler (cfg 1);
    CLIPLoader(stable_diffusion) -> CLIPTextEncode -> FluxGuidance; VAEDecode -> SaveImage."""
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": clip_l, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["clip", 0]}},
        "guidance": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["text", 0], "guidance": guidance}},
        "negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "latent": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
    }
    model = ["unet", 0]
    for i, (name, strength) in enumerate(loras):
        g[f"lora{i}"] = {"class_type": "LoraLoaderModelOnly",
                         "inputs": {"model": model, "lora_name": name, "strength_model": strength}}
        model = [f"lora{i}", 0]
    g["shift"] = {"class_type": "ModelSamplingFlux", "inputs": {
        "model": model, "max_shift": 1.15, "base_shift": 0.5, "width": size, "height": size}}
    g["sampler"] = {"class_type": "KSampler", "inputs": {
        "model": ["shift", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["guidance", 0], "negative": ["negative", 0],
        "latent_image": ["latent", 0], "denoise": 1.0}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["vae", 0]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}}
    return g
