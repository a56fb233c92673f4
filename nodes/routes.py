"""HTTP routes of the pack: the browser-side logic modules, served from ``web_logic/`` (outside ``web/``).

``web/js/`` holds only the thin extension that ComfyUI's frontend imports; its logic lives in plain ES modules in
``web_logic/`` so that ``node --test`` can test them without a browser. They are served read-only here, by exact
file name (no paths), as JavaScript modules.
"""

from __future__ import annotations

import os
import re

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "web_logic")
_NAME = re.compile(r"^[A-Za-z0-9_-]+\.mjs$")


def logic_file(name: str):
    """Path of a served logic module, or None (only plain ``*.mjs`` names inside web_logic/)."""
    if not _NAME.match(name or ""):
        return None
    path = os.path.join(ROOT, name)
    return path if os.path.isfile(path) else None


try:
    from aiohttp import web
    from server import PromptServer

    _routes = PromptServer.instance.routes

    @_routes.get("/model_merger/web_logic/{name}")
    async def _serve_logic(request):
        path = logic_file(request.match_info.get("name", ""))
        if path is None:
            return web.Response(status=404, text="not found")
        with open(path, "rb") as f:
            body = f.read()
        return web.Response(body=body, content_type="text/javascript", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})
except Exception:  # no server (scripts, tests without the stand-in): nothing to serve
    pass
