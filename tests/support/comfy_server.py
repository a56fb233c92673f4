"""Start a real ComfyUI headless with this pack installed, and talk to it. Used by test_comfyui_host.py and
bench/comfy_node_bench.py.

Environment: ``COMFYUI_DIR`` (a ComfyUI checkout with main.py; nothing runs without it) and optionally
``COMFYUI_PYTHON`` (the Python of ComfyUI's environment; default: this interpreter). The server gets its own base
folder (custom_nodes/ with a symbolic link to this repository, models/checkpoints/ with links to the test
checkpoints, output/, user/), binds 127.0.0.1 on a free port, and keeps its log in the base folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from typing import Dict, List, Optional

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACK_DIR_NAME = "model_merger"
SCRIPTS = os.path.join(PACK_ROOT, "scripts")


def comfyui_dir() -> Optional[str]:
    d = os.environ.get("COMFYUI_DIR", "").strip()
    return d if d and os.path.isfile(os.path.join(d, "main.py")) else None


def comfyui_python() -> str:
    return os.environ.get("COMFYUI_PYTHON", "").strip() or sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_base(base: str, checkpoints: Dict[str, str]) -> str:
    """A ComfyUI base folder; ``checkpoints`` maps names under models/checkpoints to the files to link."""
    for d in ("custom_nodes", "models/checkpoints", "output", "input", "user", "temp"):
        os.makedirs(os.path.join(base, d), exist_ok=True)
    link = os.path.join(base, "custom_nodes", PACK_DIR_NAME)
    if not os.path.lexists(link):
        os.symlink(PACK_ROOT, link)
    for name, target in checkpoints.items():
        dst = os.path.join(base, "models", "checkpoints", name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(target), dst)
    return base


class ComfyServer:
    def __init__(self, base: str, port: Optional[int] = None, extra_env: Optional[dict] = None):
        self.base = base
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(base, "comfyui.log")
        self.extra_env = extra_env or {}
        self.proc: Optional[subprocess.Popen] = None

    # -- life -----------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "ComfyServer":
        cdir = comfyui_dir()
        if cdir is None:
            raise RuntimeError("COMFYUI_DIR is not set to a ComfyUI checkout")
        cmd = [
            comfyui_python(), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--base-directory", self.base,
            "--output-directory", os.path.join(self.base, "output"),
            "--database-url", "sqlite:///:memory:",
        ]
        env = dict(os.environ)
        env.update(self.extra_env)
        env.setdefault("MODEL_MERGER_HOME", os.path.join(self.base, "mmhome"))
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cdir, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=5)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(1.0)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    # -- HTTP -----------------------------------------------------------------------------------------------------
    def request(self, path: str, data=None, timeout: float = 60.0):
        body = json.dumps(data).encode() if data is not None else None
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw) if raw else None
            except ValueError:
                return exc.code, raw.decode(errors="replace")

    def get(self, path: str, timeout: float = 60.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def object_info(self) -> dict:
        return self.get("/object_info")

    def queue(self, prompt: dict, client_id: Optional[str] = None):
        """POST /prompt; returns (status, answer)."""
        return self.request("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})

    def wait(self, prompt_id: str, timeout: float = 1800.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, hist = self.request(f"/history/{prompt_id}")
            if status == 200 and hist and prompt_id in hist:
                entry = hist[prompt_id]
                if (entry.get("status") or {}).get("completed") is not None:
                    return entry
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")

    def run(self, prompt: dict, timeout: float = 1800.0) -> dict:
        status, answer = self.queue(prompt)
        if status != 200:
            raise AssertionError(f"/prompt refused the workflow ({status}): {json.dumps(answer)[:3000]}")
        return self.wait(answer["prompt_id"], timeout)

    def interrupt(self):
        return self.request("/interrupt", {})

    def free(self):
        return self.request("/free", {"unload_models": True, "free_memory": True})


def messages(entry: dict, kind: str) -> List[dict]:
    return [data for name, data in (entry.get("status") or {}).get("messages") or [] if name == kind]


def load_api(name: str, **overrides) -> dict:
    """An API workflow from example_workflows/api with ``{"node.input": value}`` overrides."""
    with open(os.path.join(PACK_ROOT, "example_workflows", "api", name), encoding="utf-8") as f:
        wf = json.load(f)
    for target, value in overrides.items():
        node, name_ = target.split(".", 1)
        wf[node]["inputs"][name_] = value
    return wf


def proc_status(pid: int) -> Dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak RSS (VmHWM) of a process (Linux: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
