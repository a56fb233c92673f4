"""The ComfyUI nodes, without ComfyUI: declarations valid for the V1 loader, and the node functions run against
the stand-in host in ``comfy_stub.py`` on small real checkpoints."""

from __future__ import annotations

import json
import math
import os

import pytest

import comfy_stub
import helpers
from merger_core.merge.plan import plan_from_manifest

V1_TYPES = {"STRING", "INT", "FLOAT", "BOOLEAN", "MODEL", "CLIP", "VAE", "IMAGE", "MANIFEST"}


def nodes_of(pack):
    return pack.NODE_CLASS_MAPPINGS


def mod(pack, name):
    import sys

    return sys.modules[f"{comfy_stub.PACK_MODULE}.nodes.{name}"]


# ---------------------------------------------------------------------------------------------------------------
# Declarations


def test_root_exports_mappings_and_web_directory(comfy):
    _host, pack = comfy
    assert set(pack.__all__) >= {"NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"}
    assert set(pack.NODE_CLASS_MAPPINGS) == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    for core in ("ModelMergerScanFolder", "ModelMergerLoadManifest", "ModelMergerAddModel", "ModelMergerWeightedMerge"):
        assert core in pack.NODE_CLASS_MAPPINGS
    web = os.path.join(comfy_stub.PACK_ROOT, pack.WEB_DIRECTORY)
    js = [f for f in os.listdir(web) if f.endswith(".js")]
    assert js, "WEB_DIRECTORY has no .js file"


def _check_input(node_id, name, spec):
    assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, f"{node_id}.{name}: spec must be (type, options)"
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 else {}
    assert isinstance(opts, dict)
    assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
    if isinstance(typ, list):
        assert typ, f"{node_id}.{name}: empty combo"
        assert all(isinstance(v, str) for v in typ)
        if "default" in opts:
            assert opts["default"] in typ, f"{node_id}.{name}: default {opts['default']!r} not in the combo"
        return
    assert isinstance(typ, str) and typ, f"{node_id}.{name}: bad type"
    if typ in ("INT", "FLOAT"):
        d = opts.get("default")
        assert isinstance(d, (int, float))
        assert opts.get("min", -math.inf) <= d <= opts.get("max", math.inf), f"{node_id}.{name}: default out of bounds"
        if typ == "INT":
            assert isinstance(d, int)
    if typ == "BOOLEAN":
        assert isinstance(opts.get("default"), bool)
    if typ == "STRING":
        assert isinstance(opts.get("default", ""), str)


def test_every_node_declaration_is_valid_for_the_v1_loader(comfy, ckpts):
    _host, pack = comfy
    for node_id, cls in nodes_of(pack).items():
        assert node_id.startswith("ModelMerger"), node_id
        assert cls.CATEGORY == "model_merger"
        assert isinstance(cls.DESCRIPTION, str) and cls.DESCRIPTION
        assert callable(getattr(cls, cls.FUNCTION)), f"{node_id}: FUNCTION {cls.FUNCTION} missing"
        types = cls.INPUT_TYPES()
        assert set(types) <= {"required", "optional", "hidden"}
        assert "required" in types
        for section in ("required", "optional"):
            for name, spec in types.get(section, {}).items():
                _check_input(node_id, name, spec)
        for name, val in types.get("hidden", {}).items():
            assert val in ("UNIQUE_ID", "PROMPT", "EXTRA_PNGINFO", "DYNPROMPT", "AUTH_TOKEN_COMFY_ORG", "API_KEY_COMFY_ORG")
        assert isinstance(cls.RETURN_TYPES, tuple)
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES), node_id
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
        assert all(t for t in cls.OUTPUT_TOOLTIPS)
        for t in cls.RETURN_TYPES:
            assert isinstance(t, str) and t.upper() == t
        # the function accepts every declared input (and the hidden ones) as keywords
        import inspect

        sig = inspect.signature(getattr(cls, cls.FUNCTION))
        params = set(sig.parameters) - {"self"}
        has_kwargs = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
        for section in ("required", "optional", "hidden"):
            for name in types.get(section, {}):
                assert has_kwargs or name in params, f"{node_id}: {cls.FUNCTION}() does not take {name}"
    assert "ModelMergerWeightedMerge" in nodes_of(pack) and nodes_of(pack)["ModelMergerWeightedMerge"].OUTPUT_NODE


def test_device_dropdown_lists_existing_devices(comfy):
    _host, pack = comfy
    spec = nodes_of(pack)["ModelMergerWeightedMerge"].INPUT_TYPES()["required"]["device"]
    assert spec[0][0] == "cpu"
    for d in spec[0]:
        assert d == "cpu" or d.startswith("cuda:") or d == "mps"


# ---------------------------------------------------------------------------------------------------------------
# Building manifests


def test_add_model_chain_builds_any_n_without_touching_inputs(comfy, ckpts):
    _host, pack = comfy
    add = nodes_of(pack)["ModelMergerAddModel"]()
    names = [os.path.basename(p) for p in ckpts]
    assert add.INPUT_TYPES()["required"]["ckpt_name"][0] == sorted(names)
    m1, _ = add.add(names[0], 1.0)
    m2, _ = add.add(names[1], 2.0, manifest=m1)
    m3, summary = add.add(names[2], 1.0, manifest=m2)
    assert [os.path.basename(e.path) for e in m3.models] == names
    assert m3.weights == [1.0, 2.0, 1.0]
    assert "50.0%" in summary and "25.0%" in summary
    assert len(m1.models) == 1 and len(m2.models) == 2  # cached upstream outputs are not changed
    m4, _ = add.add(names[1], 0.5, manifest=m3)  # same checkpoint again: weight replaced
    assert m4.weights == [1.0, 0.5, 1.0] and m3.weights == [1.0, 2.0, 1.0]
    m5, _ = add.add(names[0], 0.0, manifest=m4)  # weight 0 removes it
    assert [os.path.basename(e.path) for e in m5.models] == names[1:]


def test_add_model_is_changed_follows_the_file(comfy, ckpts):
    _host, pack = comfy
    cls = nodes_of(pack)["ModelMergerAddModel"]
    name = os.path.basename(ckpts[0])
    a = cls.IS_CHANGED(ckpt_name=name, weight=1.0)
    assert cls.IS_CHANGED(ckpt_name=name, weight=1.0) == a
    st = os.stat(ckpts[0])
    os.utime(ckpts[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert cls.IS_CHANGED(ckpt_name=name, weight=1.0) != a


def test_scan_folder_defaults_to_checkpoint_folders(comfy, ckpts):
    _host, pack = comfy
    scan = nodes_of(pack)["ModelMergerScanFolder"]()
    m, summary = scan.scan("", "*.safetensors", False)
    assert [e.path for e in m.models] == sorted(ckpts)
    assert m.weights == [1.0, 1.0, 1.0]
    assert "model-0.safetensors" in summary
    m, _ = scan.scan("", "model-[12].safetensors", False)
    assert [os.path.basename(e.path) for e in m.models] == ["model-1.safetensors", "model-2.safetensors"]


def test_scan_folder_relative_subfolder_recursive_and_skipped(comfy, ckpts):
    host, pack = comfy
    sub = os.path.join(host.base, "models", "checkpoints", "pony", "deep")
    helpers.write_models(sub, 2, prefix="pony")
    open(os.path.join(sub, "old.ckpt"), "wb").close()
    scan = nodes_of(pack)["ModelMergerScanFolder"]()
    m, summary = scan.scan("pony", "pony*.safetensors", True)
    assert [os.path.basename(e.path) for e in m.models] == ["pony-0.safetensors", "pony-1.safetensors"]
    with pytest.raises(Exception, match="no .safetensors file matches"):
        scan.scan("pony", "pony*.safetensors", False)


def test_scan_folder_refuses_folders_outside_model_folders(comfy, ckpts, tmp_path, monkeypatch):
    host, pack = comfy
    outside = tmp_path / "elsewhere"
    helpers.write_models(outside, 2)
    scan = nodes_of(pack)["ModelMergerScanFolder"]()
    errors = pack.merger_core.errors
    with pytest.raises(errors.ScanError, match="outside the folders ComfyUI knows"):
        scan.scan(str(outside), "*.safetensors", False)
    with pytest.raises(errors.ScanError):
        scan.scan("../../../elsewhere", "*.safetensors", False)
    with pytest.raises(errors.ScanError, match="no '..'"):
        scan.scan("", "../../../elsewhere/*.safetensors", False)
    # IS_CHANGED never raises, and the refusal is what the run reports
    assert nodes_of(pack)["ModelMergerScanFolder"].IS_CHANGED(folder=str(outside)).startswith("error:")
    monkeypatch.setenv("MODEL_MERGER_ALLOW_ANY_FOLDER", "1")
    m, _ = scan.scan(str(outside), "*.safetensors", False)
    assert len(m.models) == 2


def test_scan_is_changed_sees_new_files(comfy, ckpts):
    host, pack = comfy
    cls = nodes_of(pack)["ModelMergerScanFolder"]
    before = cls.IS_CHANGED(folder="", pattern="*.safetensors", recursive=False)
    assert before == cls.IS_CHANGED(folder="", pattern="*.safetensors", recursive=False)
    helpers.write_model(os.path.join(host.base, "models", "checkpoints", "new.safetensors"), seed=9)
    assert cls.IS_CHANGED(folder="", pattern="*.safetensors", recursive=False) != before


def test_load_manifest_from_folder_kind_and_pasted_json(comfy, ckpts):
    host, pack = comfy
    import folder_paths

    folder = folder_paths.get_folder_paths("model_merger")[0]
    assert folder == os.path.join(host.base, "models", "model_merger")
    os.makedirs(folder, exist_ok=True)
    rel = os.path.relpath(ckpts[0], folder)
    with open(os.path.join(folder, "mine.json"), "w") as f:
        json.dump({"version": 1, "models": [{"path": rel, "weight": 3}, {"path": ckpts[1], "weight": 1}]}, f)
    cls = nodes_of(pack)["ModelMergerLoadManifest"]
    assert "mine.json" in cls.INPUT_TYPES()["required"]["manifest_file"][0]
    m, summary = cls().load("mine.json", "")
    assert [e.path for e in m.models] == ckpts[:2] and m.weights == [3.0, 1.0]
    assert "75.0%" in summary
    text = json.dumps({"version": 1, "models": [{"path": "model-2.safetensors", "weight": 1}, {"path": "model-0.safetensors"}]})
    m, _ = cls().load(cls.INPUT_TYPES()["required"]["manifest_file"][0][0], text)
    assert [e.path for e in m.models] == [ckpts[2], ckpts[0]]
    a = cls.IS_CHANGED(manifest_file="mine.json", manifest_json="")
    with open(os.path.join(folder, "mine.json"), "w") as f:
        json.dump({"version": 1, "models": [{"path": rel, "weight": 2}, {"path": ckpts[1], "weight": 1}]}, f)
    assert cls.IS_CHANGED(manifest_file="mine.json", manifest_json="") != a


def test_load_manifest_bad_input_names_the_problem(comfy, ckpts):
    host, pack = comfy
    cls = nodes_of(pack)["ModelMergerLoadManifest"]
    errors = pack.merger_core.errors
    pasted = cls.INPUT_TYPES()["required"]["manifest_file"][0][0]
    with pytest.raises(errors.ManifestError, match="no manifest"):
        cls().load(pasted, "   ")
    bad = json.dumps({"version": 1, "models": [{"path": "model-0.safetensors", "weight": -1}, {"path": "model-1.safetensors"}]})
    with pytest.raises(errors.ManifestError, match=r"models\[0\].*weight"):
        cls().load(pasted, bad)
    missing = json.dumps({"version": 1, "models": [{"path": "model-0.safetensors"}, {"path": "nope.safetensors"}]})
    with pytest.raises(errors.ManifestError, match="nope.safetensors"):
        cls().load(pasted, missing)
    with pytest.raises(errors.ManifestError, match="not valid JSON"):
        cls().load(pasted, "{not json")


def test_load_manifest_refuses_models_outside_model_folders(comfy, ckpts, tmp_path):
    host, pack = comfy
    outside = helpers.write_models(tmp_path / "outside", 2)
    cls = nodes_of(pack)["ModelMergerLoadManifest"]
    text = json.dumps({"version": 1, "models": [{"path": p} for p in outside]})
    with pytest.raises(pack.merger_core.errors.ScanError, match="outside the folders ComfyUI knows"):
        cls().load(cls.INPUT_TYPES()["required"]["manifest_file"][0][0], text)


def test_folder_kind_merges_into_user_entry(comfy, tmp_path):
    host, pack = comfy
    import folder_paths

    user_dir = str(tmp_path / "user_manifests")
    folder_paths.folder_names_and_paths["model_merger"] = ([user_dir], set())
    mod(pack, "_host").register_folder_kind()
    paths, exts = folder_paths.folder_names_and_paths["model_merger"]
    assert paths[0] == user_dir and paths[1].endswith(os.path.join("models", "model_merger"))
    assert ".json" in exts


def test_save_manifest_roundtrip(comfy, ckpts):
    host, pack = comfy
    add = nodes_of(pack)["ModelMergerAddModel"]()
    m, _ = add.add(os.path.basename(ckpts[0]), 1.0)
    m, _ = add.add(os.path.basename(ckpts[1]), 2.0, manifest=m)
    out = nodes_of(pack)["ModelMergerSaveManifest"]().save(m, "chain")
    path = out["result"][0]
    assert path.endswith(os.path.join("model_merger", "chain.json"))
    loaded, _ = nodes_of(pack)["ModelMergerLoadManifest"]().load("chain.json", "")
    assert loaded.weights == [1.0, 2.0] and [e.path for e in loaded.models] == ckpts[:2]
    with pytest.raises(pack.merger_core.errors.ManifestError):
        nodes_of(pack)["ModelMergerSaveManifest"]().save(m, "../escape")


# ---------------------------------------------------------------------------------------------------------------
# Weighted Merge


def _manifest(pack, paths, weights):
    add = nodes_of(pack)["ModelMergerAddModel"]()
    m = None
    for p, w in zip(paths, weights):
        m, _ = add.add(os.path.basename(p), w, manifest=m)
    return m


def test_merge_to_graph_hands_the_merged_state_dict_to_comfyui(comfy, ckpts):
    import torch

    host, pack = comfy
    weights = [1.0, 2.0, 1.0]
    m = _manifest(pack, ckpts, weights)
    node = nodes_of(pack)["ModelMergerWeightedMerge"]()
    model, clip, vae, report = node.merge(m, "cpu", "fp32", "graph", "checkpoints/merged", unique_id="7")
    assert model.kind == "MODEL" and clip.kind == "CLIP" and vae.kind == "VAE"
    sd = host.loaded_state_dicts[-1]
    ref, bound = helpers.reference_merge(ckpts, weights)
    assert set(sd) == set(ref)
    for k, r in ref.items():
        got = sd[k]
        if got.dtype.is_floating_point:
            assert torch.allclose(got.double(), r.double(), rtol=0, atol=float(bound[k].max()) * 1e-6 + 1e-7), k
        else:
            assert torch.equal(got, r), k
    # progress: every key, from the executing thread's ProgressBar; throttled text with rate and ETA
    total = len(ref)
    assert host.progress[-1][:2] == (total, total) and host.progress[-1][2] == "7"
    assert any("MB/s" in t and "ETA" in t for _, t in host.texts)
    event, data = host.events[-1]
    assert event == "model_merger.done" and data["status"] == "done" and data["output"] is None
    assert "saved: no" in report and "model-1.safetensors" in report and "50.0%" in report
    assert not os.listdir(os.path.join(host.base, "output"))


def test_merge_to_disk_streams_the_same_file_as_the_engine(comfy, ckpts):
    host, pack = comfy
    weights = [1.0, 1.0, 2.0]
    m = _manifest(pack, ckpts, weights)
    node = nodes_of(pack)["ModelMergerWeightedMerge"]()
    model, clip, vae, report = node.merge(m, "cpu", "fp16", "disk", "checkpoints/merged", unique_id="3")
    out = os.path.join(host.base, "output", "checkpoints", "merged_00001_.safetensors")
    assert os.path.exists(out)
    for blocked in (model, clip, vae):
        assert "disk mode" in blocked.message
    ref, bound = helpers.reference_merge(ckpts, weights)
    rep = helpers.check_against_reference(out, ref, bound, 3)
    assert rep.ok, rep
    # the node writes what the CLI/engine writes for the same plan
    eng = pack.merger_core.merge.runner
    cli_out = os.path.join(host.base, "engine.safetensors")
    eng.merge_to_file(plan_from_manifest(m, device="cpu", dtype="fp16"), cli_out)
    assert helpers.data_sha256(out) == helpers.data_sha256(cli_out)
    assert helpers.data_sha256(out) in report
    assert "checkpoints/merged_00001_.safetensors" in report
    assert host.events[-1][1]["output"] == "checkpoints/merged_00001_.safetensors"
    node.merge(m, "cpu", "fp16", "disk", "checkpoints/merged", unique_id="3")
    assert os.path.exists(out.replace("00001", "00002"))


def test_merge_both_saves_and_loads(comfy, ckpts):
    host, pack = comfy
    m = _manifest(pack, ckpts[:2], [1.0, 1.0])
    model, clip, vae, report = nodes_of(pack)["ModelMergerWeightedMerge"]().merge(m, "cpu", "fp16", "both", "sub/both")
    assert os.path.exists(os.path.join(host.base, "output", "sub", "both_00001_.safetensors"))
    assert model.kind == "MODEL" and len(host.loaded_state_dicts) == 1


@pytest.mark.parametrize("prefix", ["../escape", "/tmp/abs", "checkpoints/../../x", "..", ""])
def test_prefix_escaping_the_output_folder_is_refused(comfy, ckpts, prefix):
    host, pack = comfy
    cls = nodes_of(pack)["ModelMergerWeightedMerge"]
    problem = cls.VALIDATE_INPUTS(filename_prefix=prefix)
    assert isinstance(problem, str) and problem
    assert cls.VALIDATE_INPUTS(filename_prefix="checkpoints/ok") is True
    m = _manifest(pack, ckpts[:2], [1.0, 1.0])
    with pytest.raises(pack.merger_core.errors.OutputError):
        cls().merge(m, "cpu", "fp16", "disk", prefix)
    assert not os.path.exists(os.path.join(host.base, "escape"))


def test_interrupt_stops_cleans_up_and_the_next_merge_works(comfy, ckpts):
    host, pack = comfy
    import comfy.model_management as mm

    m = _manifest(pack, ckpts, [1.0, 1.0, 1.0])
    node = nodes_of(pack)["ModelMergerWeightedMerge"]()
    host.interrupt_after_updates = 50
    with pytest.raises(mm.InterruptProcessingException):
        node.merge(m, "cpu", "fp16", "disk", "checkpoints/merged")
    assert len(host.progress) == 50  # stopped within one key of the request
    out_dir = os.path.join(host.base, "output", "checkpoints")
    assert os.listdir(out_dir) == []  # no partial or temporary file
    assert host.events[-1][1]["status"] == "cancelled"
    host.interrupt_after_updates = None
    host.progress.clear()
    node.merge(m, "cpu", "fp16", "disk", "checkpoints/merged")
    assert os.listdir(out_dir) == ["merged_00001_.safetensors"]
    assert host.events[-1][1]["status"] == "done"


def test_engine_errors_reach_the_user_with_their_message(comfy, ckpts):
    host, pack = comfy
    folder = os.path.join(host.base, "models", "checkpoints")
    odd = helpers.write_model(os.path.join(folder, "odd.safetensors"), seed=5, drop=[helpers.KEY_OUT])
    m = _manifest(pack, [ckpts[0], odd], [1.0, 1.0])
    node = nodes_of(pack)["ModelMergerWeightedMerge"]()
    with pytest.raises(pack.merger_core.errors.IncompatibleModelsError, match="odd.safetensors"):
        node.merge(m, "cpu", "fp16", "disk", "checkpoints/merged")
    data = host.events[-1][1]
    assert data["status"] == "failed" and "odd.safetensors" in data["message"]
    assert not os.path.exists(os.path.join(host.base, "output", "checkpoints", "merged_00001_.safetensors"))


def test_unrecognised_model_is_a_clear_error(comfy, ckpts):
    host, pack = comfy
    host.detect_result = False
    m = _manifest(pack, ckpts[:2], [1.0, 1.0])
    with pytest.raises(pack.merger_core.errors.ModelMergerError, match="did not recognise"):
        nodes_of(pack)["ModelMergerWeightedMerge"]().merge(m, "cpu", "fp16", "graph", "x")


def test_short_memory_unloads_cached_models_first(comfy, ckpts, monkeypatch):
    host, pack = comfy
    h = mod(pack, "_host")
    monkeypatch.setattr(h, "available_ram", lambda: 1000)
    m = _manifest(pack, ckpts[:2], [1.0, 1.0])
    *_, report = nodes_of(pack)["ModelMergerWeightedMerge"]().merge(m, "cpu", "fp16", "graph", "x")
    assert host.unloads == 1 and "unloaded ComfyUI's cached models" in report
    monkeypatch.setattr(h, "available_ram", lambda: 1 << 50)
    *_, report = nodes_of(pack)["ModelMergerWeightedMerge"]().merge(m, "cpu", "fp16", "graph", "x")
    assert host.unloads == 1 and "unloaded" not in report


def test_progress_text_format(comfy):
    _host, pack = comfy
    h = mod(pack, "_host")
    info = pack.merger_core.merge.runner.ProgressInfo(10, 40, 250_000_000, 1_000_000_000, "k", 2.0)
    text = h.progress_text(info)
    assert "key 10/40" in text and "125 MB/s" in text and "ETA 6.0 s" in text


def test_browser_logic_is_served_from_the_web_directory(comfy):
    """ComfyUI serves everything under WEB_DIRECTORY and auto-loads only *.js: the helper is a .mjs there, imported
    relatively by the extension, and the pack needs no route of its own."""
    host, pack = comfy
    web = os.path.join(comfy_stub.PACK_ROOT, pack.WEB_DIRECTORY)
    assert os.path.isfile(os.path.join(web, "logic", "toast.mjs"))
    with open(os.path.join(web, "model_merger.js"), encoding="utf-8") as f:
        assert 'from "./logic/toast.mjs"' in f.read()
    assert not any("model_merger" in r for r in host.routes)


def test_notes_of_the_run_reach_the_node_report(comfy, ckpts):
    """nonfinite "warn" (from the manifest) writes the values and says so: the report shows the run's notes."""
    import dataclasses

    from safetensors.torch import load_file, save_file

    host, pack = comfy
    key = "model.diffusion_model.out.2.bias"
    t = load_file(ckpts[1])
    t[key][0] = float("inf")
    save_file(t, ckpts[1])
    m = dataclasses.replace(_manifest(pack, ckpts, [1.0, 1.0, 1.0]), nonfinite="warn")
    node = nodes_of(pack)["ModelMergerWeightedMerge"]()
    *_, report = node.merge(m, "cpu", "fp16", "disk", "checkpoints/warned", unique_id="4")
    assert "nonfinite warn" in report and key in report, report



# ---------------------------------------------------------------------------------------------------------------
# threads: merge workers on the CPU, on every merging node

MERGING_NODES = ["ModelMergerWeightedMerge", "ModelMergerMergeModels", "ModelMergerTrainDifference",
                 "ModelMergerCrossArchMerge"]
# one key of 3 x 2^18 elements: larger than one merge worker's slice, so threads=2 really splits a key's work
BIG_KEY = ("model.diffusion_model.model_merger_test_big.weight", ("F16", (768, 1024)))


def test_every_merging_node_has_an_optional_threads_input_after_its_widgets(comfy):
    """Optional (old API prompts without it run) and last (old UI workflows store their widget values by position:
    the new widget's value comes after every old one)."""
    _host, pack = comfy
    for node_id in MERGING_NODES:
        types = nodes_of(pack)[node_id].INPUT_TYPES()
        assert "threads" not in types["required"], node_id
        assert list(types["optional"]) == ["threads"], node_id
        typ, opts = types["optional"]["threads"]
        assert typ == "INT" and (opts["default"], opts["min"], opts["max"]) == (0, 0, 256), node_id
        assert "CPU" in opts["tooltip"] and "never changes the output bytes" in opts["tooltip"], node_id
        assert "auto" in opts["tooltip"], node_id
        assert not opts.get("control_after_generate"), node_id  # no extra widget after it


def _run_merging_node(pack, host, node_id, names, prefix, **threads):
    """Run a merging node in disk mode on ``names`` (checkpoint file names); returns the saved file's path."""
    cls = nodes_of(pack)[node_id]
    add = nodes_of(pack)["ModelMergerAddModel"]()
    if node_id == "ModelMergerWeightedMerge":
        m = _manifest(pack, names, [1.0, 2.0, 1.0])
        cls().merge(m, "cpu", "fp16", "disk", prefix, unique_id="1", **threads)
    elif node_id == "ModelMergerMergeModels":
        rows = json.dumps([{"ckpt": n, "weight": w, "on": True} for n, w in zip(names, [1.0, 2.0, 1.0])])
        cls().merge(rows, True, "cpu", "fp16", "disk", prefix, unique_id="1", **threads)
    elif node_id == "ModelMergerTrainDifference":
        cls().merge(*names, 0.7, "", "cpu", "fp16", "disk", prefix, unique_id="1", **threads)
    else:
        m, _ = add.add(names[1], 1.0)
        m, _ = add.add(names[2], 2.0, manifest=m)
        cls().merge(m, f"checkpoints/{names[0]}", "ties", 1.0, 0.2, 0.5, "delta", "base", "", 0, "cpu", "fp16",
                    "disk", prefix, unique_id="1", **threads)
    event = host.events[-1][1]
    assert event["status"] == "done", event
    return os.path.join(host.base, "output", event["output"])


@pytest.mark.parametrize("node_id", MERGING_NODES)
def test_threads_reaches_the_plan_and_never_changes_the_bytes(comfy, node_id, monkeypatch):
    host, pack = comfy
    monkeypatch.delenv("MODEL_MERGER_THREADS", raising=False)
    folder = os.path.join(host.base, "models", "checkpoints")
    names = [os.path.basename(p) for p in helpers.write_models(folder, 3, prefix="big", extra=dict([BIG_KEY]))]
    runner = pack.merger_core.merge.runner
    seen = []
    prepare = runner.prepare

    def spy(plan, *a, **kw):
        seen.append(plan.threads)
        return prepare(plan, *a, **kw)

    monkeypatch.setattr(runner, "prepare", spy)
    outs = {}
    for label, kw in (("t1", {"threads": 1}), ("t2", {"threads": 2}), ("old", {})):
        # one file name in three folders: the title in the metadata comes from the name
        outs[label] = _run_merging_node(pack, host, node_id, names, f"checkpoints/{label}/merged", **kw)
    assert seen == [1, 2, 0], "threads must reach MergePlan.threads (a call without it: 0, auto)"
    digests = {label: helpers.sha256_file(p) for label, p in outs.items()}
    assert digests["t1"] == digests["t2"] == digests["old"], digests


def test_threads_out_of_range_is_a_clear_error(comfy, ckpts):
    host, pack = comfy
    m = _manifest(pack, ckpts, [1.0, 1.0, 1.0])
    node = nodes_of(pack)["ModelMergerWeightedMerge"]()
    for bad in (-1, 257, 1.5, "four"):
        with pytest.raises(pack.merger_core.errors.ModelMergerError,
                           match=r"threads must be a whole number from 0 \(auto\) to 256"):
            node.merge(m, "cpu", "fp16", "disk", "checkpoints/bad", threads=bad, unique_id="2")
        assert host.events[-1][1]["status"] == "failed" and "threads" in host.events[-1][1]["message"]
    assert not os.path.exists(os.path.join(host.base, "output", "checkpoints"))
