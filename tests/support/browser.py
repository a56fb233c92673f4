"""Headless Chromium driven over the DevTools protocol (aiohttp's websocket client), for the browser tests.

``chromium_path()`` is None when no browser is installed (the tests skip then). ``Browser`` starts Chromium with a
fresh profile on a free DevTools port; ``Page`` evaluates JavaScript in the page and collects console messages and
uncaught exceptions with the script URL they came from.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import List, Optional

from scripts.screenshot_workflow import free_port as _free_port, http_json  # noqa: F401  (one DevTools/HTTP helper for the script and the tests)

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio",
         "--disable-dev-shm-usage"]


def chromium_path() -> Optional[str]:
    env = os.environ.get("CHROMIUM", "").strip()
    if env and os.path.isfile(env):
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    return None


class Page:
    """One page target: ``await page.js(expr)`` returns the value (promises awaited); ``console`` collects
    ``{"level", "text", "url"}`` for console errors/warnings and uncaught exceptions."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.console: List[dict] = []
        self._pending = {}
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
                continue
            method = data.get("method")
            params = data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
                frames = (params.get("stackTrace") or {}).get("callFrames") or []
                text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                self.console.append({"level": params["type"], "text": text,
                                     "url": " ".join(f.get("url", "") for f in frames)})
            elif method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                frames = (d.get("stackTrace") or {}).get("callFrames") or []
                self.console.append({"level": "exception",
                                     "text": (d.get("exception") or {}).get("description") or d.get("text", ""),
                                     "url": " ".join([d.get("url", "")] + [f.get("url", "") for f in frames])})
            elif method == "Log.entryAdded":
                e = params.get("entry", {})
                if e.get("level") in ("error", "warning"):
                    self.console.append({"level": e["level"], "text": e.get("text", ""), "url": e.get("url", "")})

    async def send(self, method, **params):
        self.next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self.next_id] = fut
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        msg = await asyncio.wait_for(fut, 600)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg.get("result", {})

    async def js(self, expression, await_promise=True):
        res = await self.send("Runtime.evaluate", expression=expression, awaitPromise=await_promise,
                              returnByValue=True)
        if res.get("exceptionDetails"):
            raise RuntimeError(f"JS error: {json.dumps(res['exceptionDetails'])[:3000]}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression, timeout=120.0, every=0.25):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = await self.js(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            await asyncio.sleep(every)
        raise TimeoutError(f"timed out waiting for: {expression[:200]}")

    async def screenshot(self, path, fmt=None, quality=85):
        fmt = fmt or ("jpeg" if path.lower().endswith((".jpg", ".jpeg")) else "png")
        kw = {"quality": quality} if fmt == "jpeg" else {}
        shot = await self.send("Page.captureScreenshot", format=fmt, **kw)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(shot["data"]))
        return path


class Browser:
    """``async with Browser(url, width, height) as page:`` a ComfyUI page with the app loaded."""

    def __init__(self, url: str, width: int = 1600, height: int = 900, chromium: Optional[str] = None):
        self.url = url
        self.width = width
        self.height = height
        self.chromium = chromium or chromium_path()
        self.proc = None
        self.profile = None

    async def __aenter__(self) -> Page:
        import aiohttp

        port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="mm-chromium-")
        self.proc = subprocess.Popen(
            [self.chromium, *FLAGS, f"--user-data-dir={self.profile}", f"--remote-debugging-port={port}",
             f"--window-size={self.width},{self.height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        target = None
        while time.monotonic() < deadline and target is None:
            try:
                pages = http_json(f"http://127.0.0.1:{port}/json/list")
                target = next((p for p in pages if p.get("type") == "page"), None)
            except OSError:
                pass
            if target is None:
                await asyncio.sleep(0.3)
        if target is None:
            raise RuntimeError("Chromium did not open a page")
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        page = Page(self.ws)
        for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
            await page.send(domain)
        await page.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)
        await page.send("Page.navigate", url=self.url + "/")
        await page.wait_for("!!(window.app && app.graph && window.LiteGraph && "
                            "LiteGraph.registered_node_types['ModelMergerWeightedMerge'] && app.extensionManager)",
                            timeout=180)
        await asyncio.sleep(1.0)
        self.page = page
        return page

    async def __aexit__(self, *exc):
        try:
            self.page._reader.cancel()
        except Exception:
            pass
        try:
            await self.ws.close()
            await self.session.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            shutil.rmtree(self.profile, ignore_errors=True)


def prepare_server_settings(url: str) -> None:
    """No first-run template dialog, minimap or canvas statistics."""
    for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                           ("Comfy.Graph.CanvasInfo", False)):
        try:
            http_json(f"{url}/settings/{setting}", value, method="POST")
        except OSError:
            pass
