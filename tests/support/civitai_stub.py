"""A local stand-in for the CivitAI REST API (the parts documented in docs/civitai.md), for tests.

Runs an aiohttp server on 127.0.0.1 in a background thread::

    with CivitaiStub() as stub:
        stub.add_version(make_version(...))
        stub.script["GET /api/v1/model-versions/by-hash/ABC"] = [429, 429]   # then normal answers
        client = CivitaiClient(stub.base_url, ...)

Routes: ``GET /api/v1/model-versions/by-hash/{hash}`` (any of the file hashes, case-insensitive), ``POST
/api/v1/model-versions/by-hash`` (JSON list of up to 100 hashes; misses left out), ``GET
/api/v1/model-versions/{id}``, ``GET /api/v1/models/{id}``, ``GET /api/download/models/{id}`` (redirects to
``/files/{name}``, on ``download_host`` when set) and ``GET /files/{name}`` (HTTP Range support).

A version may carry ``"_match": [hashes]``: hashes it is served for although its ``files[]`` do not list them
(CivitAI's archived versions answer with ``files: []``); the key is not sent.

Every request is recorded in ``stub.requests`` as ``(method, path, headers dict)``. ``stub.script`` maps
``"METHOD path"`` to a list of scripted answers used first, one per request: an int status (empty JSON error body),
``"malformed"`` (200 with a body that is not JSON), ``("json", value)`` (200 with ``value`` as the JSON body, e.g. an
answer with the wrong types), ``("error", status, text)`` (that status with ``{"error": text}``), ``("redirect",
url)`` (a 302 to ``url``), ``("sleep", seconds)`` (answer late), or
``("cut", n)`` (a file answer that stops after n bytes).
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Dict, List, Optional

from aiohttp import web


def make_version(
    version_id: int,
    model_id: int,
    sha256: str,
    *,
    name: str = "v1.0",
    model_name: str = "Stub Model",
    base_model: str = "SDXL 1.0",
    base_model_type: str = "Standard",
    model_type: str = "Checkpoint",
    trained_words=("stubword",),
    file_name: str = "stub_model.safetensors",
    extra_hashes: Optional[Dict[str, str]] = None,
    size_kb: float = 1.0,
    images: int = 2,
    other_files: List[dict] = (),
    files: Optional[List[dict]] = None,
) -> dict:
    hashes = {"SHA256": sha256.upper()}
    hashes.update({k: v.upper() for k, v in (extra_hashes or {}).items()})
    if files is None:
        files = [
            {
                "id": version_id * 10,
                "name": file_name,
                "type": "Model",
                "sizeKB": size_kb,
                "primary": True,
                "metadata": {"format": "SafeTensor", "size": "full", "fp": "fp16"},
                "hashes": hashes,
                "downloadUrl": f"__BASE__/api/download/models/{version_id}",
            },
            *other_files,
        ]
    return {
        "id": version_id,
        "modelId": model_id,
        "name": name,
        "baseModel": base_model,
        "baseModelType": base_model_type,
        "trainedWords": list(trained_words),
        "model": {"name": model_name, "type": model_type, "nsfw": False},
        "files": files,
        "images": [
            {"url": f"https://image.example/{version_id}/{i}.jpeg", "nsfwLevel": 1, "width": 512, "height": 768}
            for i in range(images)
        ],
        "downloadUrl": f"__BASE__/api/download/models/{version_id}",
        "publishedAt": "2025-01-01T00:00:00.000Z",
    }


class CivitaiStub:
    def __init__(self, download_host: Optional[str] = None):
        self.versions: Dict[int, dict] = {}
        self.blobs: Dict[str, bytes] = {}  # file name -> bytes served under /files/
        self.version_files: Dict[int, str] = {}  # version id -> file name for /api/download/models/{id}
        self.script: Dict[str, list] = {}
        self.requests: List[tuple] = []
        self.download_host = download_host  # e.g. "localhost" to redirect downloads to another host
        self.port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self._ready = threading.Event()

    # -- data ----------------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1"

    def add_version(self, version: dict) -> dict:
        self.versions[version["id"]] = version
        return version

    def add_file(self, version_id: int, name: str, data: bytes) -> None:
        self.blobs[name] = data
        self.version_files[version_id] = name

    def count(self, method: str, path_prefix: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and p.startswith(path_prefix))

    def _render(self, v: dict) -> dict:
        v = {k: x for k, x in v.items() if k != "_match"}
        return json.loads(json.dumps(v).replace("__BASE__", f"http://127.0.0.1:{self.port}"))

    def _find(self, h: str) -> Optional[dict]:
        h = h.upper()
        for v in self.versions.values():
            if h in [x.upper() for x in v.get("_match", ())]:  # answers for hashes not in files[] (archived)
                return v
            files = v.get("files")
            for f in files if isinstance(files, list) else []:  # a deliberately malformed version has no match
                hashes = f.get("hashes") if isinstance(f, dict) else None
                if isinstance(hashes, dict) and h in [str(x).upper() for x in hashes.values()]:
                    return v
        return None

    # -- server --------------------------------------------------------------------------------------------------
    async def _scripted(self, request: web.Request):
        self.requests.append((request.method, request.path, dict(request.headers)))
        queue = self.script.get(f"{request.method} {request.path}")
        if not queue:
            return None
        step = queue.pop(0)
        if isinstance(step, int):
            return web.json_response({"error": f"scripted {step}"}, status=step)
        if step == "malformed":
            return web.Response(text="<html>not json", content_type="application/json")
        if isinstance(step, tuple) and step[0] == "json":
            return web.json_response(step[1])
        if isinstance(step, tuple) and step[0] == "error":
            return web.json_response({"error": step[2]}, status=step[1])
        if isinstance(step, tuple) and step[0] == "redirect":
            return web.Response(status=302, headers={"Location": step[1]})
        if isinstance(step, tuple) and step[0] == "sleep":
            await asyncio.sleep(step[1])
            return None
        if isinstance(step, tuple) and step[0] == "cut":
            return step
        raise AssertionError(f"unknown script step {step!r}")

    async def by_hash(self, request: web.Request):
        r = await self._scripted(request)
        if r is not None:
            return r
        v = self._find(request.match_info["hash"])
        if v is None:
            return web.json_response({"error": "Model not found"}, status=404)
        return web.json_response(self._render(v))

    async def by_hashes(self, request: web.Request):
        r = await self._scripted(request)
        if r is not None:
            return r
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(body, list) or len(body) > 100:
            return web.json_response({"error": "send a list of at most 100 hashes"}, status=400)
        out, seen = [], set()
        for h in body:
            v = self._find(str(h))
            if v is not None and v["id"] not in seen:
                seen.add(v["id"])
                out.append(self._render(v))
        return web.json_response(out)

    async def version(self, request: web.Request):
        r = await self._scripted(request)
        if r is not None:
            return r
        v = self.versions.get(int(request.match_info["id"]))
        if v is None:
            return web.json_response({"error": "Model not found"}, status=404)
        return web.json_response(self._render(v))

    async def model(self, request: web.Request):
        r = await self._scripted(request)
        if r is not None:
            return r
        mid = int(request.match_info["id"])
        versions = [self._render(v) for v in self.versions.values() if v["modelId"] == mid]
        if not versions:
            return web.json_response({"error": "Model not found"}, status=404)
        return web.json_response({"id": mid, "name": versions[0]["model"]["name"], "modelVersions": versions})

    async def download(self, request: web.Request):
        r = await self._scripted(request)
        if r is not None:
            return r
        name = self.version_files.get(int(request.match_info["id"]))
        if name is None:
            return web.json_response({"error": "Model not found"}, status=404)
        host = self.download_host or "127.0.0.1"
        raise web.HTTPTemporaryRedirect(f"http://{host}:{self.port}/files/{name}")

    async def files(self, request: web.Request):
        r = await self._scripted(request)
        cut = None
        if isinstance(r, tuple):
            cut = r[1]
        elif r is not None:
            return r
        name = request.match_info["name"]
        data = self.blobs.get(name)
        if data is None:
            return web.json_response({"error": "no such file"}, status=404)
        start = 0
        status = 200
        headers = {"Content-Disposition": f'attachment; filename="{name}"', "Accept-Ranges": "bytes"}
        rng = request.headers.get("Range")
        if rng:
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if cut is not None:
            await resp.write(body[:cut])
            # drop the connection before the promised length
            request.transport.close()
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/model-versions/by-hash/{hash}", self.by_hash)
        app.router.add_post("/api/v1/model-versions/by-hash", self.by_hashes)
        app.router.add_get("/api/v1/model-versions/{id:\\d+}", self.version)
        app.router.add_get("/api/v1/models/{id:\\d+}", self.model)
        app.router.add_get("/api/download/models/{id:\\d+}", self.download)
        app.router.add_get("/files/{name}", self.files)
        return app

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)

        async def start():
            self._runner = web.AppRunner(self._app(), access_log=None)
            await self._runner.setup()
            # listen on 127.0.0.1 only; "localhost" is the same interface but another host name for redirects
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            await site.start()
            self.port = site._server.sockets[0].getsockname()[1]

        loop.run_until_complete(start())
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())
        loop.close()

    def __enter__(self) -> "CivitaiStub":
        self._thread = threading.Thread(target=self._serve, name="civitai-stub", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("CivitAI stub did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
