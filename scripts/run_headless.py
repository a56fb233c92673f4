#!/usr/bin/env python3
"""Queue an API-format workflow on a running ComfyUI server and wait for it to finish.

    python scripts/run_headless.py example_workflows/api/merge_to_graph_and_preview.json \
        --server http://127.0.0.1:8188 --set 4.ckpt_name=my_model.safetensors

It POSTs the workflow to /prompt, follows the server's websocket (/ws) and prints progress (the node running,
its progress bar, Model Merger's progress text and its done event), then prints the outputs from /history.
Without the ``aiohttp`` package it polls /history instead (no progress lines).

Exit status: 0 done; 1 the run failed (the node error is printed); 2 the server refused the workflow (validation
errors are printed per node); 3 interrupted; 4 timed out; 5 the server cannot be reached or the file is unusable.
Needs only the Python standard library (plus aiohttp for live progress).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

EXIT_OK, EXIT_FAILED, EXIT_REFUSED, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_UNREACHABLE = 0, 1, 2, 3, 4, 5
TEXT_EVENT = 3  # ComfyUI's binary websocket message carrying a node's progress text


class Failure(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def load_workflow(path: str, sets) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            wf = json.load(f)
    except (OSError, ValueError) as exc:
        raise Failure(EXIT_UNREACHABLE, f"cannot read {path}: {exc}")
    if isinstance(wf, dict) and "nodes" in wf and "links" in wf:
        raise Failure(EXIT_UNREACHABLE, f"{path} is a UI-format workflow; queue its API-format twin "
                                        "(example_workflows/api/) or export one with 'Export (API)'")
    if isinstance(wf, dict) and "prompt" in wf and isinstance(wf["prompt"], dict):
        wf = wf["prompt"]
    if not isinstance(wf, dict) or not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise Failure(EXIT_UNREACHABLE, f"{path} is not an API-format workflow ({{id: {{class_type, inputs}}}})")
    for item in sets or []:
        target, sep, value = item.partition("=")
        node, dot, name = target.partition(".")
        if not sep or not dot or node not in wf:
            raise Failure(EXIT_UNREACHABLE, f"--set {item!r}: expected NODE_ID.INPUT=VALUE with a node of the workflow")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        wf[node].setdefault("inputs", {})[name] = parsed
    return wf


def http(server: str, path: str, data=None, timeout: float = 30.0):
    url = server.rstrip("/") + path
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"null")
        except ValueError:
            return exc.code, None
    except (urllib.error.URLError, OSError) as exc:
        raise Failure(EXIT_UNREACHABLE, f"cannot reach ComfyUI at {server}: {getattr(exc, 'reason', exc)}")


def describe_refusal(answer) -> str:
    lines = []
    err = (answer or {}).get("error") or {}
    if isinstance(err, dict):
        lines.append(f"{err.get('message', 'refused')}: {err.get('details', '')}".rstrip(": "))
    for node, info in ((answer or {}).get("node_errors") or {}).items():
        for e in info.get("errors", []):
            lines.append(f"  node {node} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}")
    return "\n".join(lines) or json.dumps(answer)


def queue(server: str, workflow: dict, client_id: str) -> str:
    status, answer = http(server, "/prompt", {"prompt": workflow, "client_id": client_id})
    if status != 200:
        raise Failure(EXIT_REFUSED, "the server refused the workflow:\n" + describe_refusal(answer))
    if answer.get("node_errors"):
        raise Failure(EXIT_REFUSED, "the server refused the workflow:\n" + describe_refusal(answer))
    return answer["prompt_id"]


def history_result(server: str, prompt_id: str):
    status, hist = http(server, f"/history/{prompt_id}")
    if status != 200 or not hist or prompt_id not in hist:
        return None
    return hist[prompt_id]


def outcome(entry: dict, workflow: dict, out) -> int:
    st = entry.get("status") or {}
    for name, data in st.get("messages") or []:
        if name == "execution_error":
            node = data.get("node_id")
            cls = data.get("node_type") or workflow.get(str(node), {}).get("class_type")
            raise Failure(EXIT_FAILED, f"node {node} ({cls}) failed: {data.get('exception_type', '')}: "
                                       f"{data.get('exception_message', '').strip()}")
        if name == "execution_interrupted":
            raise Failure(EXIT_INTERRUPTED, f"interrupted at node {data.get('node_id')}")
    if st.get("status_str") not in (None, "success"):
        raise Failure(EXIT_FAILED, f"run ended with status {st.get('status_str')}")
    for node, output in (entry.get("outputs") or {}).items():
        cls = workflow.get(node, {}).get("class_type", "?")
        for img in output.get("images", []) or []:
            sub = f"{img.get('subfolder')}/" if img.get("subfolder") else ""
            print(f"output: node {node} ({cls}) image {img.get('type', 'output')}/{sub}{img.get('filename')}", file=out)
        for text in output.get("text", []) or []:
            print(f"output: node {node} ({cls}): {text}", file=out)
    print("done", file=out)
    return EXIT_OK


async def follow_ws(server: str, client_id: str, workflow: dict, deadline: float, out, queue_fn) -> str:
    import asyncio

    import aiohttp

    parsed = urllib.parse.urlparse(server)
    scheme = "wss" if parsed.scheme == "https" else "ws"
    ws_url = f"{scheme}://{parsed.netloc}{parsed.path.rstrip('/')}/ws?clientId={client_id}"
    last_text = {}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(ws_url, heartbeat=30) as ws:
            prompt_id = queue_fn()
            print(f"queued prompt {prompt_id}", file=out)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Failure(EXIT_TIMEOUT, f"timed out waiting for prompt {prompt_id}")
                try:
                    msg = await ws.receive(timeout=min(left, 5.0))
                except (TimeoutError, asyncio.TimeoutError):
                    if history_result(server, prompt_id):  # finished while we were not looking
                        return prompt_id
                    continue
                if msg.type == aiohttp.WSMsgType.BINARY:
                    data = msg.data
                    if len(data) >= 8 and struct.unpack(">I", data[:4])[0] == TEXT_EVENT:
                        n = struct.unpack(">I", data[4:8])[0]
                        node = data[8 : 8 + n].decode(errors="replace")
                        text = data[8 + n :].decode(errors="replace")
                        if last_text.get(node) != text:
                            last_text[node] = text
                            print(f"  [{node}] {text}", file=out)
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        return prompt_id  # fall back to polling
                    continue
                ev = json.loads(msg.data)
                kind, data = ev.get("type"), ev.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "executing" and data.get("node"):
                    node = data["node"]
                    print(f"executing node {node} ({workflow.get(node, {}).get('class_type', '?')})", file=out)
                elif kind == "progress":
                    v, m = data.get("value"), data.get("max")
                    if v == m or (m and v % max(1, m // 10) == 0):
                        print(f"  progress {v}/{m}", file=out)
                elif kind == "model_merger.done":
                    print(f"model_merger.done: {data.get('status')}: {data.get('message')}", file=out)
                elif kind == "execution_cached" and data.get("nodes"):
                    print(f"cached: {', '.join(data['nodes'])}", file=out)
                elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                    return prompt_id
                elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    return prompt_id


def run(args, out=None) -> int:
    out = out or sys.stdout
    workflow = load_workflow(args.workflow, args.set)
    client_id = uuid.uuid4().hex
    deadline = time.monotonic() + args.timeout
    prompt_id = None
    use_ws = not args.poll
    if use_ws:
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            print("aiohttp is not installed: polling /history (no live progress)", file=out)
            use_ws = False
    if use_ws:
        import asyncio

        try:
            prompt_id = asyncio.run(follow_ws(args.server, client_id, workflow, deadline, out,
                                              lambda: queue(args.server, workflow, client_id)))
        except Failure:
            raise
        except OSError as exc:
            raise Failure(EXIT_UNREACHABLE, f"cannot open the websocket of {args.server}: {exc}")
    else:
        prompt_id = queue(args.server, workflow, client_id)
        print(f"queued prompt {prompt_id}", file=out)
    while True:
        entry = history_result(args.server, prompt_id)
        if entry and (entry.get("status") or {}).get("completed") is not None:
            return outcome(entry, workflow, out)
        if time.monotonic() > deadline:
            raise Failure(EXIT_TIMEOUT, f"timed out waiting for prompt {prompt_id}")
        time.sleep(0.5)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workflow", help="API-format workflow JSON (example_workflows/api/*.json)")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI address (default %(default)s)")
    p.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                   help="change an input before queueing (VALUE is JSON if it parses, else a string); repeatable")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the result (default %(default)s)")
    p.add_argument("--poll", action="store_true", help="poll /history instead of following the websocket")
    args = p.parse_args(argv)
    try:
        return run(args)
    except Failure as f:
        print(f"error: {f}", file=sys.stderr)
        return f.code
    except KeyboardInterrupt:
        print("stopped waiting (the run continues on the server; POST /interrupt cancels it)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
