#!/usr/bin/env python3
"""Take a picture of a workflow in a real ComfyUI page, with headless Chromium (for the README).

    python scripts/screenshot_workflow.py --server http://127.0.0.1:8188 \
        --workflow example_workflows/merge_to_graph_and_preview.json --out docs/images/merge_and_preview.png \
        --run --widget 6.width=256 --widget 6.height=256 --widget 7.steps=4

Chromium is started with a fresh profile and a DevTools port; the page is driven through the DevTools protocol
(needs aiohttp): the workflow is loaded with ``app.loadGraphData``, widgets can be changed, ``--run`` queues it from
the page (so the page shows progress, outputs and the toast) and waits for the queue to empty, then the view is
fitted and a PNG (or a JPEG, for an ``--out`` ending in .jpg: the template thumbnails) is captured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url, data=None, method=None, timeout=30):
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


class Page:
    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    async def send(self, method, **params):
        self.next_id += 1
        my = self.next_id
        await self.ws.send_str(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads((await self.ws.receive()).data)
            if msg.get("id") == my:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expression, await_promise=True):
        res = await self.send("Runtime.evaluate", expression=expression, awaitPromise=await_promise, returnByValue=True)
        if res.get("exceptionDetails"):
            raise RuntimeError(f"JS error: {json.dumps(res['exceptionDetails'])[:2000]}")
        return res.get("result", {}).get("value")


async def drive(args, devtools_port):
    import aiohttp

    deadline = time.monotonic() + 60
    target = None
    while time.monotonic() < deadline and target is None:
        try:
            pages = http_json(f"http://127.0.0.1:{devtools_port}/json/list")
            target = next((p for p in pages if p.get("type") == "page"), None)
        except OSError:
            pass
        if target is None:
            await asyncio.sleep(0.5)
    if target is None:
        raise RuntimeError("Chromium did not open a page")
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.send("Emulation.setDeviceMetricsOverride", width=args.width, height=args.height,
                            deviceScaleFactor=1, mobile=False)
            # wait for the app and the node definitions (our nodes among them)
            for _ in range(240):
                ok = await page.js("!!(window.app && app.graph && window.LiteGraph && "
                                   "LiteGraph.registered_node_types['ModelMergerWeightedMerge'])")
                if ok:
                    break
                await asyncio.sleep(0.5)
            else:
                raise RuntimeError("the ComfyUI page did not finish loading")
            await asyncio.sleep(2)
            await page.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'})); true")
            with open(args.workflow, encoding="utf-8") as f:
                wf = json.load(f)
            await page.js(f"app.loadGraphData({json.dumps(wf)}).then(() => true)")
            for item in args.widget or []:
                target_, _, value = item.partition("=")
                nid, _, name = target_.partition(".")
                try:
                    val = json.loads(value)
                except ValueError:
                    val = value
                await page.js(
                    f"(() => {{ const n = app.graph.getNodeById({int(nid)}); const w = n.widgets.find(w => w.name === "
                    f"{json.dumps(name)}); w.value = {json.dumps(val)}; w.callback?.(w.value); return true; }})()"
                )
            if args.run:
                before = set(http_json(f"{args.server}/history").keys())
                await page.js("app.queuePrompt(0, 1).then(() => true)")
                t0 = time.monotonic()
                while time.monotonic() - t0 < args.run_timeout:
                    q = http_json(f"{args.server}/queue")
                    hist = http_json(f"{args.server}/history")
                    if not q["queue_running"] and not q["queue_pending"] and set(hist) - before:
                        break
                    await asyncio.sleep(1)
                else:
                    raise RuntimeError("the run did not finish in time")
                new = [hist[k] for k in set(hist) - before]
                print("run:", [h["status"]["status_str"] for h in new])
                await asyncio.sleep(args.settle)
            scale = await page.js(
                f"(() => {{ const top = {0 if args.canvas_only else args.top_margin}; "
                "const ds = app.canvas.ds; const nodes = app.graph._nodes; const el = app.canvas.canvas; "
                "const W = el.clientWidth, H = el.clientHeight; "
                "let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9; "
                "for (const n of nodes) { x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30); "
                "x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]); } "
                "const pad = 20; const s = Math.min((W - 2 * pad) / (x1 - x0), (H - top - 2 * pad) / (y1 - y0)); "
                "ds.scale = s; ds.offset[0] = (W - s * (x1 - x0)) / 2 / s - x0; ds.offset[1] = (top + pad) / s - y0; "
                "app.canvas.setDirty(true, true); app.canvas.draw(true, true); return s; })()"
            )
            print(f"zoom {scale:.2f}")
            await asyncio.sleep(1.0)
            fmt = "jpeg" if args.out.lower().endswith((".jpg", ".jpeg")) else "png"
            kw = {"quality": 85} if fmt == "jpeg" else {}
            if args.canvas_only:  # the graph without the page's bars (template thumbnails)
                r = await page.js("(() => { const b = app.canvas.canvas.getBoundingClientRect(); "
                                  "return [b.left, b.top, b.width, b.height]; })()")
                kw["clip"] = {"x": r[0], "y": r[1], "width": r[2], "height": r[3], "scale": args.scale}
            shot = await page.send("Page.captureScreenshot", format=fmt, **kw)
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "wb") as f:
                f.write(base64.b64decode(shot["data"]))
            print(args.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", default="http://127.0.0.1:8188")
    p.add_argument("--workflow", required=True, help="UI-format workflow JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--width", type=int, default=1920)
    p.add_argument("--height", type=int, default=1080)
    p.add_argument("--top-margin", type=int, default=80, help="pixels of the page's top bar to keep clear")
    p.add_argument("--canvas-only", action="store_true", help="capture the canvas only (no sidebar, no top bar)")
    p.add_argument("--scale", type=float, default=1.0, help="scale of the capture (with --canvas-only)")
    p.add_argument("--widget", action="append", metavar="NODE.NAME=VALUE", help="set a widget after loading")
    p.add_argument("--run", action="store_true", help="queue the workflow from the page and wait for it")
    p.add_argument("--run-timeout", type=float, default=1800)
    p.add_argument("--settle", type=float, default=3.0, help="seconds to let the page update after the run")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    args = p.parse_args(argv)
    args.server = args.server.rstrip("/")
    # no first-run template dialog, minimap or canvas statistics in the picture
    for setting, value in (("Comfy.TutorialCompleted", True), ("Comfy.Minimap.Visible", False),
                           ("Comfy.Graph.CanvasInfo", False)):
        try:
            http_json(f"{args.server}/settings/{setting}", value, method="POST")
        except OSError:
            pass
    port = free_port()
    profile = tempfile.mkdtemp(prefix="mm-chromium-")
    proc = subprocess.Popen(
        [args.chromium, *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
         f"--window-size={args.width},{args.height}", args.server + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        asyncio.run(drive(args, port))
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
