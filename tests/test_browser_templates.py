"""Every example workflow in the real frontend: headless Chromium over the DevTools protocol, a real ComfyUI.

Needs ``COMFYUI_DIR`` (and ``COMFYUI_PYTHON``) and a Chromium (``chromium`` on PATH or ``CHROMIUM``); skipped
otherwise. For each template it checks what a user would see after dragging it onto the canvas: every node type
exists (no "missing nodes"), every widget shows the value the API twin gives that input (a template storing one
value too few puts ``fp16`` on ``device``), the prompt the page builds equals the API twin, and no console error or
exception comes from this pack's files. Then it queues the template from the page, as shipped except for a small
render (64 x 64, one step, to keep CPU time short), and checks that it succeeds, that queueing it again runs
nothing (the seed controls are fixed: the same prompt merges once), and that a new node's seed control is fixed.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import time

import pytest

import browser as br
import comfy_fixtures
import comfy_server as cs

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(cs.comfyui_dir() is None, reason="COMFYUI_DIR is not set to a ComfyUI checkout"),
    pytest.mark.skipif(br.chromium_path() is None, reason="no Chromium on this machine (apt-get install chromium)"),
]

ROOT = os.path.join(cs.PACK_ROOT, "example_workflows")
TEMPLATES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.json")))
NAMES = ["model_a.safetensors", "model_b.safetensors", "model_c.safetensors", "model_d.safetensors"]
SMALL_RENDER = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": 1}}
PACK_URL = f"/extensions/{cs.PACK_DIR_NAME}/"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = comfy_fixtures.ensure_checkpoints(count=4)
    links = {n: f for n, f in zip(NAMES, files)}
    links.update({f"to_merge/{n}": f for n, f in zip(NAMES, files)})
    base = cs.make_base(str(tmp_path_factory.mktemp("comfy_browser")), links)
    srv = cs.ComfyServer(base).start()
    br.prepare_server_settings(srv.url)
    yield srv
    srv.stop()


def run(coro):
    return asyncio.run(coro)


STATE_JS = """(() => app.graph._nodes.map(n => ({
  id: n.id, type: n.type, registered: !!LiteGraph.registered_node_types[n.type],
  widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value, values: Array.isArray(w.options?.values) ? w.options.values : null})),
})))()"""


async def _history_ids(url):
    return set(br.http_json(f"{url}/history?max_items=10000"))


async def _queue_from_page(page, url, timeout=1500):
    before = await _history_ids(url)
    await page.js("app.queuePrompt(0, 1).then(() => true)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        q = br.http_json(f"{url}/queue")
        new = (await _history_ids(url)) - before
        if new and not q["queue_running"] and not q["queue_pending"]:
            hist = br.http_json(f"{url}/history/{next(iter(new))}")
            return next(iter(hist.values()))
        await asyncio.sleep(0.5)
    raise TimeoutError("the queued template did not finish")


def pack_errors(page):
    return [c for c in page.console if PACK_URL in c.get("url", "") or PACK_URL in c.get("text", "")
            or "[Model Merger]" in c.get("text", "")]


async def check_template(server, name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        ui = json.load(f)
    with open(os.path.join(ROOT, "api", name), encoding="utf-8") as f:
        api = json.load(f)
    async with br.Browser(server.url, 1600, 900) as page:
        await page.js(f"app.loadGraphData({json.dumps(ui)}).then(() => true)")
        await asyncio.sleep(1.0)
        nodes = {str(n["id"]): n for n in await page.js(STATE_JS)}
        # every node is there and known (a missing node type gets a placeholder that is not registered)
        for n in ui["nodes"]:
            got = nodes.get(str(n["id"]))
            assert got and got["type"] == n["type"], f"{name}: node {n['id']} ({n['type']}) is missing"
            assert got["registered"], f"{name}: node type {n['type']} is missing in the frontend"
        # every widget shows the API twin's value for its input; combos hold a value of their list
        for nid, spec in api.items():
            widgets = {w["name"]: w for w in nodes[nid]["widgets"]}
            for inp, value in spec["inputs"].items():
                if isinstance(value, list):
                    continue
                assert inp in widgets, f"{name}: node {nid} has no widget {inp}"
                shown = widgets[inp]["value"]
                assert shown == value, f"{name}: node {nid} widget {inp} shows {shown!r}, the template means {value!r}"
            for w in nodes[nid]["widgets"]:
                if w["values"] is not None:
                    assert w["value"] in w["values"], f"{name}: node {nid} widget {w['name']}: {w['value']!r} not in its list"
                if w["name"] == "control_after_generate":
                    assert w["value"] == "fixed", f"{name}: node {nid}: the seed control is {w['value']!r}"
        # the prompt the page builds is the API twin
        built = await page.js("app.graphToPrompt().then(p => p.output)")
        assert set(built) == set(api), f"{name}: the page builds nodes {sorted(built)}, the twin has {sorted(api)}"
        for nid, spec in api.items():
            assert built[nid]["class_type"] == spec["class_type"]
            for inp, value in spec["inputs"].items():
                got = built[nid]["inputs"].get(inp)
                if isinstance(value, list):
                    assert [str(got[0]), got[1]] == [str(value[0]), value[1]], f"{name}: node {nid} input {inp}"
                else:
                    assert got == value, f"{name}: node {nid} input {inp}: page {got!r}, twin {value!r}"
        # a small render, then queue it as the page would
        for nid, spec in api.items():
            for inp, value in SMALL_RENDER.get(spec["class_type"], {}).items():
                await page.js(f"(() => {{ const w = app.graph.getNodeById({nid}).widgets.find(w => w.name === "
                              f"{json.dumps(inp)}); w.value = {json.dumps(value)}; return true; }})()")
        entry = await _queue_from_page(page, server.url)
        assert entry["status"]["status_str"] == "success", f"{name}: {json.dumps(entry['status'])[:3000]}"
        # the same prompt again: nothing runs (no seed changed after the run)
        again = await _queue_from_page(page, server.url)
        assert again["status"]["status_str"] == "success"
        ran = [m for m in cs.messages(again, "execution_start")]
        cached = set()
        for m in cs.messages(again, "execution_cached"):
            cached.update(str(x) for x in m.get("nodes", []))
        merging = [nid for nid, s in api.items() if s["class_type"].startswith("ModelMerger")]
        assert set(merging) <= cached, f"{name}: queued twice, merge nodes {sorted(set(merging) - cached)} ran again"
        assert ran is not None
        errors = pack_errors(page)
        assert not errors, f"{name}: console errors from the pack: {errors}"


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_loads_right_and_runs_as_shipped(server, name):
    run(check_template(server, name))


async def _new_nodes(server):
    async with br.Browser(server.url, 1600, 900) as page:
        await page.js("app.graph.clear(); true")
        got = await page.js("""(() => {
          const n = LiteGraph.createNode('ModelMergerCrossArchMerge'); app.graph.add(n);
          const k = LiteGraph.createNode('KSampler'); app.graph.add(k);
          const ctl = x => x.widgets.find(w => w.name === 'control_after_generate')?.value;
          return {cross: ctl(n), ksampler: ctl(k)};
        })()""")
        assert got["cross"] == "fixed", got  # a new Cross-Arch Merge does not re-merge on every run
        assert got["ksampler"] == "randomize", got  # other nodes keep the frontend's default
        assert not pack_errors(page), pack_errors(page)


def test_new_node_seed_control_is_fixed(server):
    run(_new_nodes(server))


ROWS_JS = "(id => app.graph.getNodeById(id).widgets.filter(w => /^model \\d+$/.test(w.name)).map(w => w.value))"
TRACKER = "app.extensionManager.workflow.activeWorkflow.changeTracker"


async def _rows_node(server):
    with open(os.path.join(ROOT, "merge_rows_to_disk.json"), encoding="utf-8") as f:
        ui = json.load(f)
    async with br.Browser(server.url, 1600, 900) as page:
        await page.js(f"app.loadGraphData({json.dumps(ui)}).then(() => true)")
        await asyncio.sleep(0.5)
        three = ["model_a.safetensors", "model_b.safetensors", "model_c.safetensors"]
        assert await page.js(ROWS_JS + "(1)") == three
        await page.js(f"{TRACKER}.checkState(); true")
        await page.js("(() => { app.graph.getNodeById(1).widgets.find(w => w.name === '+ Add model').callback(); "
                      "return true; })()")
        await page.js(f"{TRACKER}.checkState(); true")
        four = await page.js(ROWS_JS + "(1)")
        assert len(four) == 4 and four[:3] == three and four[3] not in three  # the next checkpoint not listed yet
        models = json.loads(await page.js("app.graphToPrompt().then(p => p.output['1'].inputs.models)"))
        assert [r["ckpt"] for r in models] == four and models[3] == {"ckpt": four[3], "weight": 1, "on": True}
        saved = await page.js("app.graph.getNodeById(1).serialize().widgets_values")
        assert len(saved) == 7 and json.loads(saved[0]) == models  # the rows are one value, not 17 (7: threads last)
        # undo and redo
        await page.js(f"{TRACKER}.undo().then(() => true)")
        await asyncio.sleep(0.3)
        assert await page.js(ROWS_JS + "(1)") == three
        await page.js(f"{TRACKER}.redo().then(() => true)")
        await asyncio.sleep(0.3)
        assert await page.js(ROWS_JS + "(1)") == four
        # copy and paste
        await page.js("(() => { const n = app.graph.getNodeById(1); app.canvas.deselectAll(); app.canvas.select(n); "
                      "app.canvas.copyToClipboard(); app.canvas.pasteFromClipboard(); return true; })()")
        await asyncio.sleep(0.3)
        ids = await page.js("app.graph._nodes.filter(n => n.type === 'ModelMergerMergeModels').map(n => n.id)")
        assert len(ids) == 2 and await page.js(ROWS_JS + f"({ids[1]})") == four
        # reload
        await page.js("(async () => { const d = app.graph.serialize(); app.graph.clear(); await app.loadGraphData(d); "
                      "return true; })()")
        await asyncio.sleep(0.3)
        for nid in ids:
            assert await page.js(ROWS_JS + f"({nid})") == four
        assert not pack_errors(page), pack_errors(page)


def test_rows_node_survives_reload_copy_paste_and_undo(server):
    run(_rows_node(server))


BLOCKS_STATE = """(id => { const n = app.graph.getNodeById(id); const ws = n.widgets;
  const text = ws.find(w => w.name === 'scale_blocks');
  return {text: text.value, textIndex: ws.indexOf(text), arch: ws.find(w => w.name === 'scale_blocks architecture')?.value,
          preset: ws.find(w => w.name === 'scale_blocks preset')?.value, property: n.properties?.model_merger_block_arch ?? null,
          sliders: ws.filter(w => w.type === 'slider' && w.name.startsWith('scale_blocks ')).map(w => [w.label, w.value]),
          firstSlider: ws.findIndex(w => w.type === 'slider'), saved: n.serialize().widgets_values}; })"""


def _widget_call(nid, name, value):
    return (f"(() => {{ const w = app.graph.getNodeById({nid}).widgets.find(w => w.name === {json.dumps(name)}); "
            f"w.value = {json.dumps(value)}; w.callback(w.value); return true; }})()")


async def _block_editor(server):
    with open(os.path.join(ROOT, "cross_merge_to_graph_and_preview.json"), encoding="utf-8") as f:
        ui = json.load(f)
    node = next(n for n in ui["nodes"] if n["type"] == "ModelMergerCrossArchMerge")
    nid = node["id"]
    spec = br.http_json(f"{server.url}/object_info/ModelMergerCrossArchMerge")["ModelMergerCrossArchMerge"]
    blocks_spec = spec["input"]["required"]["scale_blocks"][1]["model_merger_blocks"]
    archs = {a["id"]: a for a in blocks_spec["archs"]}
    async with br.Browser(server.url, 1600, 900) as page:
        await page.js(f"app.loadGraphData({json.dumps(ui)}).then(() => true)")
        await asyncio.sleep(0.5)
        st = await page.js(BLOCKS_STATE + f"({nid})")
        # the editor sits right under the text, shows SDXL's 21 blocks, and nothing of it is saved
        assert st["text"] == "" and st["arch"] == "SDXL" and st["preset"] == "(none)"
        assert [b for b, _ in st["sliders"]] == archs["sdxl_base"]["blocks"]
        assert st["firstSlider"] == st["textIndex"] + 3
        assert st["saved"] == node["widgets_values"]
        # a preset: the text is its name, the sliders show its values
        await page.js(_widget_call(nid, "scale_blocks preset", "GRAD_V"))
        st = await page.js(BLOCKS_STATE + f"({nid})")
        assert st["text"] == "GRAD_V" and st["preset"] == "GRAD_V"
        assert [v for _, v in st["sliders"]] == blocks_spec["presets"]["GRAD_V"]["values"]["sdxl_base"]
        # a slider: one value per block, the moved one rounded to the slider's step
        await page.js(_widget_call(nid, "scale_blocks M00", 0.9034))
        st = await page.js(BLOCKS_STATE + f"({nid})")
        values = st["text"].split(",")
        assert len(values) == 21 and values[10] == "0.9" and st["preset"] == "(custom)"
        grad = blocks_spec["presets"]["GRAD_V"]["values"]["sdxl_base"]
        assert [float(v) for v in values[:10]] == pytest.approx(grad[:10], abs=1e-6)
        built = await page.js(f"app.graphToPrompt().then(p => p.output['{nid}'].inputs)")
        assert built["scale_blocks"] == st["text"]
        assert not [k for k in built if k.startswith("scale_blocks ")]  # the editor is not in the prompt
        saved = st["saved"]
        assert len(saved) == len(node["widgets_values"]) and st["text"] in saved  # the text is; the sliders are not
        # editing the text moves the sliders (the others show the global scale); text that does not parse leaves them
        await page.js(_widget_call(nid, "scale_blocks", "IN00=0.1,OUT=0.4"))
        st = await page.js(BLOCKS_STATE + f"({nid})")
        sl = dict(st["sliders"])
        assert sl["IN00"] == 0.1 and sl["OUT05"] == 0.4 and sl["M00"] == 1.0 and st["preset"] == "(custom)"
        await page.js(_widget_call(nid, "scale_blocks", "IN00=0.1,OUT="))
        assert dict((await page.js(BLOCKS_STATE + f"({nid})"))["sliders"]) == sl
        # SD1.5: 26 sliders; a slider then writes NAME=value pairs for the blocks the text sets
        await page.js(_widget_call(nid, "scale_blocks", "IN00=0.1"))
        await page.js(_widget_call(nid, "scale_blocks architecture", "SD1.5"))
        await page.js(_widget_call(nid, "scale_blocks OUT11", 0.5))
        st = await page.js(BLOCKS_STATE + f"({nid})")
        assert [b for b, _ in st["sliders"]] == archs["sd1"]["blocks"] and st["property"] == "sd1"
        assert st["text"] == "IN00=0.1,OUT11=0.5"
        assert (await page.js(f"app.graphToPrompt().then(p => p.output['{nid}'].inputs.scale_blocks)")) == st["text"]
        # reload keeps the text, the architecture and the sliders
        await page.js("(async () => { const d = app.graph.serialize(); app.graph.clear(); await app.loadGraphData(d); "
                      "return true; })()")
        await asyncio.sleep(0.3)
        again = await page.js(BLOCKS_STATE + f"({nid})")
        assert again["text"] == st["text"] and again["arch"] == "SD1.5" and again["sliders"] == st["sliders"]
        assert again["saved"] == st["saved"]
        # a new Train Difference gets the editor for alpha_blocks; its sliders fall back to alpha
        got = await page.js("""(() => { const n = LiteGraph.createNode('ModelMergerTrainDifference'); app.graph.add(n);
          return {sliders: n.widgets.filter(w => w.type === 'slider').map(w => w.value).length,
                  names: n.widgets.map(w => w.name), saved: n.serialize().widgets_values.length}; })()""")
        assert got["sliders"] == 21 and got["names"].index("alpha_blocks preset") == got["names"].index("alpha_blocks") + 2
        # model_a, b, c, alpha, alpha_blocks, device, dtype, output_mode, filename_prefix, threads
        assert got["saved"] == 10
        assert not pack_errors(page), pack_errors(page)


def test_block_weight_editor_writes_the_text_the_cli_reads(server):
    run(_block_editor(server))


LORA_ROWS_JS = ("(id => app.graph.getNodeById(id).widgets.filter(w => /^lora \\d+( |$)/.test(w.name))"
                ".map(w => [w.name, w.value, Array.isArray(w.options?.values) ? w.options.values : null]))")
PROMPT_ROWS = "app.graphToPrompt().then(p => p.output['1'].inputs.models)"


def _click(nid, name):
    return (f"(() => {{ app.graph.getNodeById({nid}).widgets.find(w => w.name === {json.dumps(name)}).callback(); "
            "return true; })()")


async def _rows_lora(server):
    import kohya_lora

    loras = os.path.join(server.base, "models", "loras")
    os.makedirs(loras, exist_ok=True)
    kohya_lora.write_kohya_lora(os.path.join(loras, "style.safetensors"),
                                os.path.join(server.base, "models", "checkpoints", "model_a.safetensors"))
    with open(os.path.join(ROOT, "merge_rows_to_disk.json"), encoding="utf-8") as f:
        ui = json.load(f)
    stored = ui["nodes"][0]["widgets_values"][0]
    async with br.Browser(server.url, 1600, 900) as page:
        await page.js(f"app.loadGraphData({json.dumps(ui)}).then(() => true)")
        await asyncio.sleep(0.5)
        # a workflow saved before LoRA rows: its rows as they were, no LoRA row, the value untouched
        assert await page.js(LORA_ROWS_JS + "(1)") == []
        assert await page.js(PROMPT_ROWS) == stored
        names = await page.js("app.graph.getNodeById(1).widgets.map(w => w.name)")
        assert names[-2:] == ["+ Add model", "+ Add LoRA"], names
        await page.js(_click(1, "+ Add LoRA"))
        got = await page.js(LORA_ROWS_JS + "(1)")
        assert [g[:2] for g in got] == [["lora 1 on", True], ["lora 1", "style.safetensors"],
                                        ["lora 1 strength_model", 1], ["lora 1 strength_clip", 1]], got
        assert got[1][2] == ["style.safetensors"]  # the loras folder's list, from /object_info
        await page.js(_widget_call(1, "lora 1 strength_model", 0.5))
        await page.js(_widget_call(1, "lora 1 strength_clip", -0.25))
        await page.js(_click(1, "+ Add model"))  # a model row goes before the LoRA rows
        models = json.loads(await page.js(PROMPT_ROWS))
        order = [r.get("ckpt", r.get("lora")) for r in models]
        three = ["model_a.safetensors", "model_b.safetensors", "model_c.safetensors"]
        assert order[:3] == three and "ckpt" in models[3] and order[3] not in three and order[4] == "style.safetensors"
        assert models[-1] == {"lora": "style.safetensors", "strength_model": 0.5, "strength_clip": -0.25, "on": True}
        saved = await page.js("app.graph.getNodeById(1).serialize().widgets_values")
        assert len(saved) == 7 and json.loads(saved[0]) == models  # still one value
        await page.js("(async () => { const d = app.graph.serialize(); app.graph.clear(); await app.loadGraphData(d); "
                      "return true; })()")
        await asyncio.sleep(0.3)
        assert [g[:2] for g in await page.js(LORA_ROWS_JS + "(1)")][2:] == [
            ["lora 1 strength_model", 0.5], ["lora 1 strength_clip", -0.25]]
        await page.js("(() => { app.graph.remove(app.graph.getNodeById(3)); app.canvas.ds.offset = [40, 10]; "
                      "app.canvas.ds.scale = 0.8; "
                      "app.canvas.setDirty(true, true); return true; })()")
        await asyncio.sleep(0.5)
        import tempfile

        await page.screenshot(os.path.join(os.environ.get("MODEL_MERGER_SCREENS", tempfile.gettempdir()),
                                           "model_merger_rows_lora.png"))
        # queue what the page builds: model_a + model_b (model_c is off; model_d's row switched off) + the LoRA
        await page.js(_widget_call(1, "model 4 on", False))
        await page.js(_widget_call(1, "filename_prefix", "checkpoints/rows_lora"))
        entry = await _queue_from_page(page, server.url)
        assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:3000]
        report = entry["outputs"]["2"]["text"][0]
        assert "merge of 2 models (rows) with 1 LoRA(s) baked in" in report and "style.safetensors" in report, report
        for f in glob.glob(os.path.join(server.base, "output", "checkpoints", "rows_lora_*.safetensors")):
            os.unlink(f)
        # removing the LoRA row leaves the model rows
        await page.js(_click(1, "✕ remove lora 1"))
        assert [r.get("lora") for r in json.loads(await page.js(PROMPT_ROWS))] == [None] * 4
        assert not pack_errors(page), pack_errors(page)


def test_rows_node_lora_rows_in_the_browser(server):
    run(_rows_lora(server))


MERGING = ("ModelMergerWeightedMerge", "ModelMergerMergeModels", "ModelMergerTrainDifference",
           "ModelMergerCrossArchMerge")
WIDGET_STATE = "(id => Object.fromEntries(app.graph.getNodeById(id).widgets.map(w => [w.name, w.value])))"


async def _threads(server):
    """Workflows saved before the merging nodes had ``threads`` (their widget values one shorter) load with every old
    value on its widget and threads at 0; the prompt carries threads; a changed value is saved last and sent."""
    async with br.Browser(server.url, 1600, 900) as page:
        for name in TEMPLATES:
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                ui = json.load(f)
            with open(os.path.join(ROOT, "api", name), encoding="utf-8") as f:
                api = json.load(f)
            merging = [n for n in ui["nodes"] if n["type"] in MERGING]
            if not merging:
                continue
            full = {n["id"]: list(n["widgets_values"]) for n in merging}
            for n in merging:
                assert n["widgets_values"][-1] == 0, f"{name}: node {n['id']}: the template's last value is not threads"
                n["widgets_values"] = n["widgets_values"][:-1]  # as saved before the input existed
            await page.js(f"app.loadGraphData({json.dumps(ui)}).then(() => true)")
            await asyncio.sleep(0.5)
            built = await page.js("app.graphToPrompt().then(p => p.output)")
            for n in merging:
                nid = n["id"]
                shown = await page.js(WIDGET_STATE + f"({nid})")
                assert shown["threads"] == 0, f"{name}: node {nid} shows threads {shown['threads']!r}"
                for inp, value in api[str(nid)]["inputs"].items():
                    if not isinstance(value, list):
                        assert shown[inp] == value, f"{name}: node {nid} widget {inp} shows {shown[inp]!r}"
                        assert built[str(nid)]["inputs"][inp] == value, f"{name}: node {nid} input {inp}"
                assert built[str(nid)]["inputs"]["threads"] == 0, f"{name}: node {nid}"
                saved = await page.js(f"app.graph.getNodeById({nid}).serialize().widgets_values")
                assert saved == full[nid], f"{name}: node {nid} saves {saved}, not {full[nid]}"
        # a value set on the widget: saved last, sent in the prompt; the picture shows the node with it
        with open(os.path.join(ROOT, "merge_to_graph_and_preview.json"), encoding="utf-8") as f:
            ui = json.load(f)
        nid = next(n["id"] for n in ui["nodes"] if n["type"] == "ModelMergerWeightedMerge")
        await page.js(f"app.loadGraphData({json.dumps(ui)}).then(() => true)")
        await asyncio.sleep(0.5)
        await page.js(_widget_call(nid, "threads", 2))
        assert (await page.js(f"app.graph.getNodeById({nid}).serialize().widgets_values"))[-1] == 2
        assert (await page.js(f"app.graphToPrompt().then(p => p.output['{nid}'].inputs.threads)")) == 2
        names = await page.js(f"app.graph.getNodeById({nid}).widgets.map(w => w.name)")
        assert names[-1] == "threads", names
        await page.js(f"""(() => {{ const n = app.graph.getNodeById({nid}); app.canvas.ds.scale = 1.5;
          app.canvas.ds.offset = [-n.pos[0] + 40, -n.pos[1] + 80]; app.canvas.setDirty(true, true);
          return true; }})()""")
        await asyncio.sleep(0.5)
        import tempfile

        await page.screenshot(os.path.join(os.environ.get("MODEL_MERGER_SCREENS", tempfile.gettempdir()),
                                           "model_merger_threads.png"))
        assert not pack_errors(page), pack_errors(page)


def test_threads_widget_old_workflows_load_and_the_value_is_sent(server):
    run(_threads(server))
