"""scripts/run_headless.py against a small local server that speaks ComfyUI's /prompt, /history and /ws protocol."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import struct
import threading

import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import web  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = os.path.join(ROOT, "example_workflows", "api", "scan_and_merge_to_disk.json")


def load_script():
    spec = importlib.util.spec_from_file_location("run_headless", os.path.join(ROOT, "scripts", "run_headless.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeComfy:
    """``mode``: ok | node_error | refused | interrupted."""

    def __init__(self, mode="ok"):
        self.mode = mode
        self.prompts = []
        self.sockets = {}
        self.history = {}
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/prompt", self.prompt)
        app.router.add_get("/history/{pid}", self.get_history)
        app.router.add_get("/ws", self.ws)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self.sockets[request.query["clientId"]] = ws
        async for _ in ws:
            pass
        return ws

    async def prompt(self, request):
        body = await request.json()
        self.prompts.append(body)
        if self.mode == "refused":
            return web.json_response({"error": {"message": "Prompt outputs failed validation", "details": ""},
                                      "node_errors": {"2": {"class_type": "ModelMergerWeightedMerge", "errors": [
                                          {"message": "Custom validation failed for node",
                                           "details": "filename_prefix - points outside ComfyUI's output folder"}]}}},
                                     status=400)
        pid = f"p{len(self.prompts)}"
        asyncio.get_running_loop().create_task(self.execute(pid, body["client_id"]))
        return web.json_response({"prompt_id": pid, "number": 1, "node_errors": {}})

    async def execute(self, pid, cid):
        ws = self.sockets.get(cid)
        send = (lambda t, d: ws.send_str(json.dumps({"type": t, "data": {**d, "prompt_id": pid}}))) if ws else None
        await asyncio.sleep(0.05)
        if send:
            await send("executing", {"node": "2"})
            await send("progress", {"value": 5, "max": 10, "node": "2"})
            node = b"2"
            await ws.send_bytes(struct.pack(">I", 3) + struct.pack(">I", len(node)) + node + b"merging: key 5/10 | 9 MB/s")
        messages = [["execution_start", {"prompt_id": pid}]]
        outputs = {}
        if self.mode == "ok":
            if send:
                await ws.send_str(json.dumps({"type": "model_merger.done", "data": {"status": "done", "message": "4 models merged"}}))
                await send("execution_success", {})
            outputs = {"4": {"text": ["Model Merger: weighted merge of 4 models"]}}
            status = {"status_str": "success", "completed": True, "messages": messages}
        elif self.mode == "node_error":
            err = {"node_id": "2", "node_type": "ModelMergerWeightedMerge", "exception_type": "IncompatibleModelsError",
                   "exception_message": "the models cannot be merged key by key: b.safetensors lacks 3 keys"}
            if send:
                await send("execution_error", err)
            status = {"status_str": "error", "completed": False, "messages": messages + [["execution_error", err]]}
        else:
            if send:
                await send("execution_interrupted", {"node_id": "2"})
            status = {"status_str": "error", "completed": False,
                      "messages": messages + [["execution_interrupted", {"node_id": "2"}]]}
        self.history[pid] = {"outputs": outputs, "status": status}

    async def get_history(self, request):
        pid = request.match_info["pid"]
        return web.json_response({pid: self.history[pid]} if pid in self.history else {})


@pytest.fixture
def script():
    return load_script()


def run(script, capsys, server, *extra):
    code = script.main([API, "--server", f"http://127.0.0.1:{server.port}", "--timeout", "30", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("poll", [False, True])
def test_success_prints_progress_and_outputs(script, capsys, poll):
    srv = FakeComfy("ok")
    try:
        code, out, err = run(script, capsys, srv, "--set", "2.filename_prefix=checkpoints/x", "--set", "1.recursive=true",
                             *(["--poll"] if poll else []))
    finally:
        srv.stop()
    assert code == 0, err
    sent = srv.prompts[0]["prompt"]
    assert sent["2"]["inputs"]["filename_prefix"] == "checkpoints/x" and sent["1"]["inputs"]["recursive"] is True
    assert "output: node 4 (PreviewAny): Model Merger: weighted merge of 4 models" in out
    assert out.rstrip().endswith("done")
    if not poll:
        assert "executing node 2 (ModelMergerWeightedMerge)" in out
        assert "[2] merging: key 5/10 | 9 MB/s" in out
        assert "model_merger.done: done: 4 models merged" in out


@pytest.mark.parametrize("mode,code,text", [
    ("node_error", 1, "node 2 (ModelMergerWeightedMerge) failed: IncompatibleModelsError: the models cannot be merged"),
    ("refused", 2, "points outside ComfyUI's output folder"),
    ("interrupted", 3, "interrupted at node 2"),
])
def test_failures_exit_non_zero_with_the_message(script, capsys, mode, code, text):
    srv = FakeComfy(mode)
    try:
        got, out, err = run(script, capsys, srv)
    finally:
        srv.stop()
    assert got == code and text in err, (got, out, err)


def test_ui_format_and_unreachable_server(script, capsys, tmp_path):
    ui = os.path.join(ROOT, "example_workflows", "scan_and_merge_to_disk.json")
    assert script.main([ui, "--server", "http://127.0.0.1:9"]) == 5
    assert "UI-format workflow" in capsys.readouterr().err
    assert script.main([API, "--server", "http://127.0.0.1:9", "--poll"]) == 5
    assert "cannot reach ComfyUI" in capsys.readouterr().err
    assert script.main([API, "--server", "http://127.0.0.1:9", "--set", "99.x=1"]) == 5
    assert "--set" in capsys.readouterr().err
