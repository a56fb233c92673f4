"""The pack inside a real ComfyUI (headless, CPU), on full-size SD1.5-layout checkpoints.

Runs only with ``COMFYUI_DIR`` set (and ``COMFYUI_PYTHON`` for ComfyUI's own Python); skipped otherwise.
The checkpoints (4 x 2.1 GB, seeded random fp16) are written once to ``MODEL_MERGER_BENCH_DATA``
(default /work/bench-data/comfy) by ``comfy_fixtures.py`` and linked into a private ComfyUI base folder.
"""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

import comfy_fixtures
import comfy_server as cs

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.slow,
    pytest.mark.skipif(cs.comfyui_dir() is None, reason="COMFYUI_DIR is not set to a ComfyUI checkout"),
]

NAMES = ["model_a.safetensors", "model_b.safetensors", "model_c.safetensors", "model_d.safetensors"]
SMALL_RENDER = {"6.width": 64, "6.height": 64, "7.steps": 1}


def pack_import_failures(log: str):
    """The log lines where ComfyUI says it could not import this pack (not its own optional nodes, such as the audio
    nodes that fail without torchaudio, which no pack can help)."""
    return [l for l in log.splitlines() if "IMPORT FAILED" in l and cs.PACK_DIR_NAME in l]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = comfy_fixtures.ensure_checkpoints(count=4)
    links = {n: f for n, f in zip(NAMES, files)}
    links.update({f"to_merge/{n}": f for n, f in zip(NAMES, files)})
    base = cs.make_base(str(tmp_path_factory.mktemp("comfy_base")), links)
    srv = cs.ComfyServer(base).start()
    yield srv
    srv.stop()


def render_with_checkpoint_loader(server, ckpt_name: str) -> None:
    """Load ``ckpt_name`` with ComfyUI's own CheckpointLoaderSimple and render a small image with it."""
    wf = cs.load_api("merge_to_graph_and_preview.json", **SMALL_RENDER)
    for k in ("1", "2", "3", "10"):
        del wf[k]
    wf["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}
    wf["4"]["inputs"]["clip"] = wf["5"]["inputs"]["clip"] = ["20", 1]
    wf["7"]["inputs"]["model"] = ["20", 0]
    wf["8"]["inputs"]["vae"] = ["20", 2]
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["9"]["images"]


def out_dir(server, *parts):
    return os.path.join(server.base, "output", *parts)


def test_pack_imports_and_lists_every_node(server):
    import comfy_stub

    log = server.log()
    assert not pack_import_failures(log), log[-3000:]
    assert os.path.join("custom_nodes", cs.PACK_DIR_NAME) in log  # listed among the imported packs
    host, pack = comfy_stub.install(os.path.join(server.base, "stub"))
    try:
        expected = set(pack.NODE_CLASS_MAPPINGS)
    finally:
        comfy_stub.uninstall()
    info = server.object_info()
    missing = expected - set(info)
    assert not missing, f"not in /object_info: {missing}"
    for node_id in expected:
        assert info[node_id]["category"] == "model_merger"
    # the browser extension and its logic module are served
    import urllib.request

    with urllib.request.urlopen(f"{server.url}/extensions/{cs.PACK_DIR_NAME}/model_merger.js") as r:
        assert r.status == 200 and b"model_merger.done" in r.read()

    with urllib.request.urlopen(f"{server.url}/extensions/{cs.PACK_DIR_NAME}/logic/toast.mjs") as r:
        assert r.status == 200 and "javascript" in r.headers.get("Content-Type", "")
        assert b"export function shouldNotify" in r.read()


def test_example_workflows_use_only_existing_nodes(server):
    info = server.object_info()
    folder = os.path.join(cs.PACK_ROOT, "example_workflows")
    api_files = sorted(glob.glob(os.path.join(folder, "api", "*.json")))
    ui_files = sorted(glob.glob(os.path.join(folder, "*.json")))
    assert len(api_files) >= 3 and [os.path.basename(p) for p in api_files] == [os.path.basename(p) for p in ui_files]
    for p in api_files:
        with open(p) as f:
            for node in json.load(f).values():
                assert node["class_type"] in info, (p, node["class_type"])
    for p in ui_files:
        with open(p) as f:
            for node in json.load(f)["nodes"]:
                assert node["type"] in info or node["type"] == "Note", (p, node["type"])
    status, templates = server.request("/workflow_templates")
    assert status == 200 and sorted(templates.get(cs.PACK_DIR_NAME, [])) == sorted(
        os.path.splitext(os.path.basename(p))[0] for p in ui_files
    )


def test_merge_to_graph_then_ksampler_writes_an_image(server):
    wf = cs.load_api("merge_to_graph_and_preview.json", **SMALL_RENDER)
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["9"]["images"]
    path = out_dir(server, images[0]["subfolder"], images[0]["filename"])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = entry["outputs"]["10"]["text"][0]
    assert "model_a.safetensors" in report and "merged into the graph only" in report


def test_scan_merge_to_disk_loads_back_through_checkpoint_loader(server):
    wf = cs.load_api("scan_and_merge_to_disk.json", **{"2.filename_prefix": "checkpoints/scanned"})
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = out_dir(server, "checkpoints", "scanned_00001_.safetensors")
    assert os.path.exists(out)
    assert "4 model(s)" in entry["outputs"]["3"]["text"][0]
    # output/checkpoints is a checkpoint folder: the loaders list the new file and it renders
    names = server.object_info()["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "scanned_00001_.safetensors" in names
    render_with_checkpoint_loader(server, "scanned_00001_.safetensors")


def test_manifest_built_in_graph_is_saved_and_merged(server):
    entry = server.run(cs.load_api("build_manifest_and_merge.json"))
    assert entry["status"]["status_str"] == "success", entry["status"]
    saved = os.path.join(server.base, "models", "model_merger", "my_merge.json")
    with open(saved) as f:
        manifest = json.load(f)
    assert [m["weight"] for m in manifest["models"]] == [0.5, 0.3, 0.2]
    assert os.path.exists(out_dir(server, "checkpoints", "my_merge_00001_.safetensors"))
    report = entry["outputs"]["6"]["text"][0]
    assert "50.0%" in report and "30.0%" in report and "20.0%" in report
    # Load Manifest now offers it
    choices = server.object_info()["ModelMergerLoadManifest"]["input"]["required"]["manifest_file"][0]
    assert "my_merge.json" in choices


def test_interrupt_during_merge_leaves_nothing_and_next_merge_works(server):
    wf = cs.load_api("scan_and_merge_to_disk.json", **{"2.filename_prefix": "checkpoints/interrupted"})
    status, answer = server.queue(wf)
    assert status == 200, answer
    folder = out_dir(server, "checkpoints")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # wait until the writer's temporary file exists: the merge is under way
        if glob.glob(os.path.join(folder, ".interrupted_*.partial")):
            break
        time.sleep(0.05)
    else:
        pytest.fail("the merge never started writing")
    time.sleep(1.0)
    server.interrupt()
    entry = server.wait(answer["prompt_id"])
    assert cs.messages(entry, "execution_interrupted"), entry["status"]
    left = [f for f in os.listdir(folder) if "interrupted" in f]
    assert left == [], left
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert [f for f in os.listdir(folder) if "interrupted" in f] == ["interrupted_00001_.safetensors"]


def test_bad_manifest_is_a_node_error_naming_the_problem(server):
    bad = {"version": 1, "models": [{"path": NAMES[0], "weight": -1}, {"path": NAMES[1]}]}
    wf = {
        "1": {"class_type": "ModelMergerLoadManifest",
              "inputs": {"manifest_file": "(use pasted JSON)", "manifest_json": json.dumps(bad)}},
        "2": {"class_type": "ModelMergerWeightedMerge",
              "inputs": {"manifest": ["1", 0], "device": "cpu", "dtype": "fp16", "output_mode": "disk",
                         "filename_prefix": "checkpoints/bad"}},
    }
    entry = server.run(wf)
    errors = cs.messages(entry, "execution_error")
    assert errors and errors[0]["node_id"] == "1", entry["status"]
    msg = errors[0]["exception_message"]
    assert "models[0]" in msg and "weight" in msg, msg
    assert not glob.glob(out_dir(server, "checkpoints", "bad*"))


def test_mismatched_models_are_a_node_error_naming_the_file(server):
    import helpers

    helpers.write_model(os.path.join(server.base, "models", "checkpoints", "tiny.safetensors"), seed=3)
    wf = cs.load_api("build_manifest_and_merge.json", **{"3.ckpt_name": "tiny.safetensors"})
    entry = server.run(wf)
    errors = cs.messages(entry, "execution_error")
    assert errors and errors[0]["node_type"] in ("ModelMergerWeightedMerge", "ModelMergerSaveManifest"), entry["status"]
    merge_errors = [e for e in errors if e["node_type"] == "ModelMergerWeightedMerge"]
    assert merge_errors and "tiny.safetensors" in merge_errors[0]["exception_message"], errors


def test_run_headless_script(server, tmp_path):
    import subprocess
    import sys

    script = os.path.join(cs.SCRIPTS, "run_headless.py")
    api = os.path.join(cs.PACK_ROOT, "example_workflows", "api", "scan_and_merge_to_disk.json")
    r = subprocess.run([sys.executable, script, api, "--server", server.url, "--set", "2.filename_prefix=checkpoints/headless"],
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "merging: key" in r.stdout and "MB/s" in r.stdout  # the node's progress text, live from /ws
    assert "model_merger.done: done" in r.stdout and r.stdout.rstrip().endswith("done")
    r = subprocess.run([sys.executable, script, api, "--server", server.url, "--set", "2.filename_prefix=../x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "outside ComfyUI's output folder" in r.stderr, r.stdout + r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": {"class_type": "ModelMergerLoadManifest", "inputs": {
        "manifest_file": "(use pasted JSON)", "manifest_json": "{not json"}}, "2": {
        "class_type": "PreviewAny", "inputs": {"source": ["1", 1]}}}))
    r = subprocess.run([sys.executable, script, str(bad), "--server", server.url, "--poll"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "not valid JSON" in r.stderr, r.stdout + r.stderr


def test_prefix_escaping_output_is_refused_before_running(server):
    wf = cs.load_api("scan_and_merge_to_disk.json", **{"2.filename_prefix": "../../escape"})
    status, answer = server.queue(wf)
    # the merge node is refused at validation (the scan summary preview may still run: ComfyUI queues the
    # valid part of a prompt and reports the invalid outputs in node_errors)
    errs = answer["node_errors"]["2"]["errors"]
    assert any("outside ComfyUI's output folder" in e.get("details", "") for e in errs), errs
    if status == 200:
        entry = server.wait(answer["prompt_id"])
        assert "2" not in entry.get("outputs", {})
    assert not os.path.exists(os.path.join(server.base, "escape"))
    assert not glob.glob(os.path.join(server.base, "escape*"))


def test_cross_merge_to_graph_then_ksampler_writes_an_image(server):
    wf = cs.load_api("cross_merge_to_graph_and_preview.json", **SMALL_RENDER)
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    images = entry["outputs"]["9"]["images"]
    with open(out_dir(server, images[0]["subfolder"], images[0]["filename"]), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    report = entry["outputs"]["10"]["text"][0]
    assert "base: model_a.safetensors (given)" in report and "ties" in report


def test_core_node_schemas_snapshot_matches_the_server(server):
    """test_template_widgets.py checks templates against support/core_object_info.json without ComfyUI: it must
    hold what this ComfyUI says (checkpoint lists aside)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "core_object_info.json")) as f:
        snap = json.load(f)
    info = server.object_info()
    for node_id, entry in snap.items():
        if node_id.startswith("_"):
            continue
        live = json.loads(json.dumps(info[node_id]))
        if node_id == "CheckpointLoaderSimple":
            live["input"]["required"]["ckpt_name"][0] = []
        assert live["input"] == entry["input"] and live.get("input_order") == entry.get("input_order"), node_id


def _swap_link(server, name, target):
    link = os.path.join(server.base, "models", "checkpoints", name)
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(target, link)


def _merged_files(server, prefix):
    return sorted(glob.glob(out_dir(server, "checkpoints", prefix + "_*.safetensors")))


def _cached(entry):
    nodes = set()
    for m in cs.messages(entry, "execution_cached"):
        nodes.update(str(n) for n in m.get("nodes", []))
    return nodes


@pytest.mark.parametrize("kind", ["weighted", "train", "cross"])
def test_same_prompt_merges_once_and_a_replaced_file_merges_again(server, kind):
    """Queue the same prompt twice: one merge (the node is cached). Replace an input file in place (same name,
    another file): the next identical prompt merges again."""
    files = comfy_fixtures.ensure_checkpoints(count=4)
    _swap_link(server, "swap_x.safetensors", files[2])
    prefix = f"cache_{kind}"
    if kind == "weighted":
        wf = {"1": {"class_type": "ModelMergerAddModel", "inputs": {"ckpt_name": "model_a.safetensors", "weight": 1.0}},
              "2": {"class_type": "ModelMergerAddModel",
                    "inputs": {"ckpt_name": "swap_x.safetensors", "weight": 1.0, "manifest": ["1", 0]}},
              "3": {"class_type": "ModelMergerWeightedMerge",
                    "inputs": {"manifest": ["2", 0], "device": "cpu", "dtype": "fp16", "output_mode": "disk",
                               "filename_prefix": f"checkpoints/{prefix}"}}}
    elif kind == "train":
        wf = {"3": {"class_type": "ModelMergerTrainDifference",
                    "inputs": {"model_a": "model_a.safetensors", "model_b": "model_b.safetensors",
                               "model_c": "swap_x.safetensors", "alpha": 1.0, "alpha_blocks": "", "device": "cpu",
                               "dtype": "fp16", "output_mode": "disk", "filename_prefix": f"checkpoints/{prefix}"}}}
    else:
        wf = {"1": {"class_type": "ModelMergerAddModel", "inputs": {"ckpt_name": "model_b.safetensors", "weight": 1.0}},
              "3": {"class_type": "ModelMergerCrossArchMerge",
                    "inputs": {"manifest": ["1", 0], "base": "checkpoints/swap_x.safetensors", "combine": "sum",
                               "scale": 1.0, "density": 0.2, "drop": 0.5, "text_encoder": "delta", "vae": "base",
                               "scale_blocks": "", "seed": 0, "device": "cpu", "dtype": "fp16", "output_mode": "disk",
                               "filename_prefix": f"checkpoints/{prefix}"}}}
    first = server.run(wf)
    assert first["status"]["status_str"] == "success", first["status"]
    assert len(_merged_files(server, prefix)) == 1
    again = server.run(wf)
    assert again["status"]["status_str"] == "success", again["status"]
    assert "3" in _cached(again) and len(_merged_files(server, prefix)) == 1, "the same prompt merged twice"
    _swap_link(server, "swap_x.safetensors", files[3])  # replaced in place: same name, another file
    third = server.run(wf)
    assert third["status"]["status_str"] == "success", third["status"]
    assert "3" not in _cached(third) and len(_merged_files(server, prefix)) == 2, "a replaced input gave the old merge"
    for f in _merged_files(server, prefix):
        os.unlink(f)


def test_missing_requirements_message_in_a_real_comfyui(tmp_path):
    """ComfyUI's Python without jsonschema (hidden by a sitecustomize on PYTHONPATH): the pack loads, logs one line
    with the install command, and a merge fails with that message (a node error, no traceback text)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['jsonschema'] = None\n")
    files = comfy_fixtures.ensure_checkpoints(count=2)
    base = cs.make_base(str(tmp_path / "base"), {"model_a.safetensors": files[0], "model_b.safetensors": files[1]})
    srv = cs.ComfyServer(base, extra_env={"PYTHONPATH": str(hide)}).start()
    try:
        log = srv.log()
        assert not pack_import_failures(log), log[-3000:]
        lines = [l for l in log.splitlines() if "jsonschema" in l]
        assert len(lines) == 1 and "-m pip install -r" in lines[0] and "requirements.txt" in lines[0], lines
        entry = srv.run({
            "1": {"class_type": "ModelMergerAddModel", "inputs": {"ckpt_name": "model_a.safetensors", "weight": 1.0}},
            "2": {"class_type": "ModelMergerWeightedMerge",
                  "inputs": {"manifest": ["1", 0], "device": "cpu", "dtype": "fp16", "output_mode": "disk",
                             "filename_prefix": "checkpoints/x"}}})
        errors = cs.messages(entry, "execution_error")
        assert errors and "-m pip install -r" in errors[0]["exception_message"], errors
        assert "jsonschema" in errors[0]["exception_message"]
    finally:
        srv.stop()


MERGING_NODES = ("ModelMergerWeightedMerge", "ModelMergerMergeModels", "ModelMergerTrainDifference",
                 "ModelMergerCrossArchMerge")


def test_threads_is_optional_old_prompts_run_and_the_bytes_do_not_change(server):
    """``threads`` (CPU merge workers) is an optional input of every merging node: a prompt written before it existed
    still runs, threads=2 gives the same file, and a value beyond its maximum is refused when queued."""
    import helpers

    info = server.object_info()
    for node_id in MERGING_NODES:
        inputs = info[node_id]["input"]
        assert "threads" not in inputs["required"] and inputs["optional"]["threads"][0] == "INT", node_id
        assert info[node_id]["input_order"]["optional"] == ["threads"], node_id

    def prompt(prefix, **extra):
        return {
            "1": {"class_type": "ModelMergerAddModel", "inputs": {"ckpt_name": NAMES[0], "weight": 1.0}},
            "2": {"class_type": "ModelMergerAddModel", "inputs": {"ckpt_name": NAMES[1], "weight": 2.0,
                                                                  "manifest": ["1", 0]}},
            "3": {"class_type": "ModelMergerWeightedMerge",
                  "inputs": {"manifest": ["2", 0], "device": "cpu", "dtype": "fp16", "output_mode": "disk",
                             "filename_prefix": prefix, **extra}},
            "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}},
        }

    old = prompt("checkpoints/threads_old/m")  # an API prompt from before the input existed
    assert "threads" not in old["3"]["inputs"]
    entry = server.run(old)
    assert entry["status"]["status_str"] == "success", entry["status"]
    entry = server.run(prompt("checkpoints/threads_2/m", threads=2))  # one name in two folders: same title
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = [out_dir(server, "checkpoints", d, "m_00001_.safetensors") for d in ("threads_old", "threads_2")]
    assert helpers.sha256_file(files[0]) == helpers.sha256_file(files[1])
    status, answer = server.queue(prompt("checkpoints/threads_bad/m", threads=999))
    assert status == 400, answer
    errors = json.dumps(answer["node_errors"]["3"])
    assert "threads" in errors and "256" in errors, errors
    assert not os.path.exists(out_dir(server, "checkpoints", "threads_bad"))


def test_rows_node_api_twin_with_the_headless_runner(server):
    """Merge Models' rows travel in the API prompt as the models JSON string: the API twin runs headless."""
    import subprocess
    import sys

    script = os.path.join(cs.SCRIPTS, "run_headless.py")
    api = os.path.join(cs.PACK_ROOT, "example_workflows", "api", "merge_rows_to_disk.json")
    r = subprocess.run([sys.executable, script, api, "--server", server.url, "--set",
                        "1.filename_prefix=checkpoints/rows_headless"], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.path.exists(out_dir(server, "checkpoints", "rows_headless_00001_.safetensors"))
    assert "merge of 2 models (rows)" in r.stdout, r.stdout[-3000:]
    bad = '[{"ckpt": "model_a.safetensors", "weight": 1, "on": true}, {"ckpt": "nope.safetensors", "weight": 1}]'
    r = subprocess.run([sys.executable, script, api, "--server", server.url, "--set", f"1.models={json.dumps(bad)}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "row 2: checkpoint 'nope.safetensors'" in r.stderr, r.stdout + r.stderr


def test_scaled_fp8_merge_output_loads_and_renders_in_comfyui(server):
    """Issue 12: a ComfyUI scaled-fp8 checkpoint (fp8 codes + per-layer .scale_weight + the scaled_fp8 marker)
    merged with an fp16 one gives a plain fp16 checkpoint that ComfyUI's own loader takes and renders with."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    ckpts = os.path.join(server.base, "models", "checkpoints")
    sd = load_file(os.path.join(ckpts, "model_a.safetensors"))
    unet = "model.diffusion_model."
    top = torch.finfo(torch.float8_e4m3fn).max
    for k in [k for k, v in sd.items() if k.startswith(unet) and k.endswith(".weight") and v.dim() == 2]:
        w = sd[k].float()
        scale = torch.tensor(max(float(w.abs().max()), 1e-8) / top * 1.5, dtype=torch.float32)
        sd[k] = (w / scale).clamp(-top, top).to(torch.float8_e4m3fn)
        sd[k[: -len("weight")] + "scale_weight"] = scale
    sd[unet + "scaled_fp8"] = torch.zeros((0,), dtype=torch.float8_e4m3fn)
    save_file(sd, os.path.join(ckpts, "model_fp8.safetensors"))
    del sd
    rows = json.dumps([{"ckpt": "model_fp8.safetensors", "weight": 1.0, "on": True},
                       {"ckpt": "model_b.safetensors", "weight": 1.0, "on": True}])
    wf = cs.load_api("merge_rows_to_disk.json", **{"1.models": rows, "1.filename_prefix": "checkpoints/fp8merge"})
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = out_dir(server, "checkpoints", "fp8merge_00001_.safetensors")
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys if k.startswith(unet)}
    assert not [k for k in keys if k.endswith((".scale_weight", ".scale_input", "scaled_fp8"))]
    assert dtypes <= {"F16"}, dtypes
    render_with_checkpoint_loader(server, "fp8merge_00001_.safetensors")


def test_scaled_fp8_output_loads_in_comfyui(server):
    """Issue 12: dtype fp8_scaled writes ComfyUI's scaled fp8 (e4m3fn linear weights with a per-layer scale_weight,
    the scaled_fp8 marker, the rest bf16); ComfyUI's CheckpointLoaderSimple loads it as scaled fp8 and renders."""
    from safetensors import safe_open

    rows = json.dumps([{"ckpt": "model_a.safetensors", "weight": 1.0, "on": True},
                       {"ckpt": "model_b.safetensors", "weight": 1.0, "on": True}])
    wf = cs.load_api("merge_rows_to_disk.json", **{"1.models": rows, "1.dtype": "fp8_scaled",
                                                     "1.filename_prefix": "checkpoints/fp8out"})
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = out_dir(server, "checkpoints", "fp8out_00001_.safetensors")
    unet = "model.diffusion_model."
    with safe_open(out, "pt") as f:
        keys = list(f.keys())
        fp8 = [k for k in keys if f.get_slice(k).get_dtype() == "F8_E4M3"]
        scales = [k for k in keys if k.endswith(".scale_weight")]
    assert unet + "scaled_fp8" in fp8 and len(scales) == len(fp8) - 1 > 100
    before = len(server.log())
    render_with_checkpoint_loader(server, "fp8out_00001_.safetensors")
    log = server.log()[before:]
    assert "Using scaled fp8" in log, log[-3000:]  # ComfyUI took it as scaled fp8 (comfy/ops.py)
    assert "unet missing" not in log and "unet unexpected" not in log, log[-3000:]


def test_extracted_lora_loads_in_lora_loader_without_unmatched_keys(server):
    """Issue 14: Extract LoRA writes into the loras folder a file ComfyUI's own LoraLoader takes with every key
    matched (no "lora key not loaded" / "NOT LOADED" in the log), and its LORA_MODEL output patches MODEL and CLIP
    through Apply LoRA in the same prompt; both render."""
    info = server.object_info()
    for nid in ("ModelMergerExtractLora", "ModelMergerMergeLoras", "ModelMergerApplyLora"):
        assert nid in info and info[nid]["category"] == "model_merger", nid
    assert info["ModelMergerApplyLora"]["input"]["required"]["lora"][0] == "LORA_MODEL"
    wf = cs.load_api("merge_to_graph_and_preview.json", **SMALL_RENDER)
    for k in ("1", "2", "3", "10"):
        del wf[k]
    wf["20"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model_a.safetensors"}}
    wf["30"] = {"class_type": "ModelMergerExtractLora", "inputs": {
        "tuned": "model_b.safetensors", "base": "model_a.safetensors", "rank": 4, "conv_rank": 0, "energy": 0.0,
        "dtype": "fp16", "filename_prefix": "model_merger/hosttest"}}
    wf["31"] = {"class_type": "ModelMergerApplyLora", "inputs": {
        "model": ["20", 0], "clip": ["20", 1], "lora": ["30", 0], "strength_model": 1.0, "strength_clip": 1.0}}
    wf["4"]["inputs"]["clip"] = wf["5"]["inputs"]["clip"] = ["31", 1]
    wf["7"]["inputs"]["model"] = ["31", 0]
    wf["8"]["inputs"]["vae"] = ["20", 2]
    start = len(server.log())
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert entry["outputs"]["9"]["images"]
    name = "model_merger/hosttest_00001_.safetensors"
    assert os.path.isfile(os.path.join(server.base, "models", "loras", *name.split("/")))
    log = server.log()[start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    # the file through ComfyUI's own LoraLoader (listed without a restart)
    assert name in server.object_info()["LoraLoader"]["input"]["required"]["lora_name"][0]
    wf2 = {k: v for k, v in wf.items() if k not in ("30", "31")}
    wf2["21"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["20", 0], "clip": ["20", 1], "lora_name": name, "strength_model": 1.0, "strength_clip": 1.0}}
    wf2["4"]["inputs"]["clip"] = wf2["5"]["inputs"]["clip"] = ["21", 1]
    wf2["7"]["inputs"]["model"] = ["21", 0]
    wf2["7"]["inputs"]["seed"] = 43  # not the cached result of the first prompt
    start = len(server.log())
    entry = server.run(wf2)
    assert entry["status"]["status_str"] == "success", entry["status"]
    log = server.log()[start:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]


def test_baked_lora_equals_comfyui_lora_loader_then_checkpoint_save(server):
    """Issue 14: a real kohya LoRA baked into a merge by this pack (Load Manifest -> Add LoRA To Manifest -> Weighted
    Merge, disk) equals ComfyUI's own CheckpointLoaderSimple -> LoraLoader -> CheckpointSave at the same strengths,
    tensor for tensor within fp16 rounding. The merge is model_a at weight 1 and model_b at weight 0 (the engine
    merges at least two models), so both start from the same fp16 weights; both prompts run in one queue entry."""
    import torch
    from safetensors import safe_open

    import kohya_lora
    from oracle import ulp

    ckpts = os.path.join(server.base, "models", "checkpoints")
    loras = os.path.join(server.base, "models", "loras")
    os.makedirs(loras, exist_ok=True)
    lora = os.path.join(loras, "bake_check.safetensors")
    used = kohya_lora.write_kohya_lora(lora, os.path.join(ckpts, "model_a.safetensors"), seed=11, rank=8, alpha=4.0)
    assert len(used) == len(kohya_lora.SD15_MODULES)  # every module names a key of the real SD1.5 layout
    sm, sc = 0.75, -0.5
    manifest = {"version": 1, "models": [{"path": "model_a.safetensors", "weight": 1.0},
                                         {"path": "model_b.safetensors", "weight": 0.0}]}
    wf = {
        "1": {"class_type": "ModelMergerLoadManifest",
              "inputs": {"manifest_file": "(use pasted JSON)", "manifest_json": json.dumps(manifest)}},
        "2": {"class_type": "ModelMergerAddLora",
              "inputs": {"manifest": ["1", 0], "lora_name": "bake_check.safetensors", "strength_model": sm,
                         "strength_clip": sc}},
        "3": {"class_type": "ModelMergerWeightedMerge",
              "inputs": {"manifest": ["2", 0], "device": "cpu", "dtype": "fp16", "output_mode": "disk",
                         "filename_prefix": "checkpoints/baked_lora"}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 3]}},
        "5": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "model_a.safetensors"}},
        "6": {"class_type": "LoraLoader",
              "inputs": {"model": ["5", 0], "clip": ["5", 1], "lora_name": "bake_check.safetensors",
                         "strength_model": sm, "strength_clip": sc}},
        "7": {"class_type": "CheckpointSave",
              "inputs": {"model": ["6", 0], "clip": ["6", 1], "vae": ["5", 2],
                         "filename_prefix": "checkpoints/comfy_lora"}},
    }
    entry = server.run(wf)
    assert entry["status"]["status_str"] == "success", entry["status"]
    report = entry["outputs"]["4"]["text"][0]
    assert f"baking 1 LoRA(s) into {len(used)} key(s)" in report, report
    assert f"{len(used)} of {len(used)} modules matched" in report, report
    ours_path = out_dir(server, "checkpoints", "baked_lora_00001_.safetensors")
    theirs_path = out_dir(server, "checkpoints", "comfy_lora_00001_.safetensors")
    try:
        with safe_open(ours_path, "pt") as ours, safe_open(theirs_path, "pt") as theirs, \
                safe_open(os.path.join(ckpts, "model_a.safetensors"), "pt") as base:
            common = set(ours.keys()) & set(theirs.keys())
            assert set(used.values()) <= common
            assert len(common) > 1000, (len(common), sorted(set(ours.keys()) ^ set(theirs.keys()))[:20])
            worst, changed = 0.0, 0
            for k in sorted(common):
                a, b = ours.get_tensor(k), theirs.get_tensor(k)
                assert a.dtype == torch.float16 and a.shape == b.shape, (k, a.dtype, a.shape, b.shape)
                a64, b64 = a.double(), b.double()
                # within fp16 rounding: at most one fp16 step at the value (ComfyUI may keep fp32 on the CPU)
                err = ((a64 - b64).abs() / ulp(b64, "F16")).max().item()
                assert err <= 1.0, f"{k}: differs by {err:.2f} fp16 steps from ComfyUI's LoraLoader"
                worst = max(worst, err)
                if k in used.values():  # the LoRA moves these by far more than the rounding allowed above
                    moved = ((a64 - base.get_tensor(k).double()).abs() / ulp(b64, "F16")).max().item()
                    assert moved > 20, f"{k}: the LoRA moved it by only {moved:.1f} fp16 steps"
                    changed += 1
                elif not k.startswith("first_stage_model."):
                    assert torch.equal(a, base.get_tensor(k)), f"{k} is not named by the LoRA but changed"
        assert changed == len(used)
    finally:
        for p in (ours_path, theirs_path):
            if os.path.exists(p):
                os.unlink(p)
