"""Manifest: format, round trip, path resolution, strict validation, and a real merge through to_plan()."""

from __future__ import annotations

import dataclasses
import json
import os
import re

import pytest

from merger_core import methods as methods_mod
from merger_core.merge.plan import MergePlan, plan_from_manifest
from merger_core.merge.runner import merge_to_file
from merger_core.errors import ManifestError, OutputError
from merger_core.manifest.schema import SCHEMA_PATH, load_schema
from merger_core.manifest.model import Manifest, ManifestEntry, ManifestValidationError, display_names
from merger_core.manifest.parse import load_manifest, manifest_to_json, save_manifest
from merger_core.manifest.scan import manifest_from_scan
from merger_core.manifest.validate import validate
from merger_core.manifest.scan import scan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA = "ab" * 32


def st(path, value=0.0, shape=(4, 3), extra=None) -> str:
    """A small real safetensors file: one fp32 key filled with ``value`` plus an int64 key."""
    import torch
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {"model.w": torch.full(shape, float(value)), "model.ids": torch.arange(5)}
    tensors.update(extra or {})
    save_file(tensors, path)
    return path


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "models"
    paths = [st(d / "a.safetensors", 1.0), st(d / "b.safetensors", 2.0), st(d / "sub" / "c.safetensors", 4.0)]
    return d, paths


def problems_of(exc) -> list:
    return [str(p) for p in exc.value.problems]


def write_json(path, obj) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# round trip and canonical form


CANONICAL = """{
  "version": 1,
  "method": "weighted_sum",
  "normalize": false,
  "dtype": "bf16",
  "device": "cuda:1",
  "params": {},
  "title": "Pony × Illustrious",
  "seed": 7,
  "allow_missing": true,
  "notes": "made for a test",
  "models": [
    {
      "path": "a.safetensors",
      "weight": 0.25,
      "sha256": "%s",
      "notes": "the first one"
    },
    {
      "path": "sub/c.safetensors",
      "weight": 0.75,
      "civitai": {
        "modelId": 101,
        "name": "Ünïcode model",
        "trainedWords": [
          "a",
          "b"
        ]
      }
    }
  ]
}
""" % SHA


def test_canonical_file_saves_to_identical_bytes(folder, tmp_path):
    d, paths = folder
    src = d / "manifest.json"
    src.write_bytes(CANONICAL.encode("utf-8"))
    m = load_manifest(src)
    assert m.path == str(src)
    assert m.models[0].path == paths[0] and m.models[1].path == paths[2]
    out = d / "again.json"
    save_manifest(m, out)
    assert out.read_bytes() == src.read_bytes()
    # and saving over the source itself changes nothing
    save_manifest(m, src)
    assert src.read_bytes() == CANONICAL.encode("utf-8")
    assert not [n for n in os.listdir(d) if n.endswith(".tmp")]


def test_load_of_save_equals_original(folder, tmp_path):
    d, paths = folder
    m = Manifest(
        models=[
            ManifestEntry(paths[0], 0.5, sha256=SHA, notes="n"),
            ManifestEntry(paths[1], 2.0, civitai={"id": 3, "nested": {"x": [1, 2.5, None]}}),
            ManifestEntry(paths[2], 1e-3),
        ],
        method="weighted_sum",
        normalize=True,
        dtype="fp32",
        device="auto",
        title="t",
        seed=3,
        allow_missing=True,
        notes="x",
    )
    for target in (d / "m.json", tmp_path / "elsewhere" / "m.json"):
        os.makedirs(target.parent, exist_ok=True)
        save_manifest(m, target)
        back = load_manifest(target)
        assert back == m
        assert back.path == str(target)
    # the path it was loaded from is not part of equality
    assert dataclasses.replace(m, path="/x/y.json") == m


def test_paths_inside_are_relative_with_slashes_outside_absolute(folder, tmp_path):
    d, paths = folder
    outside = st(tmp_path / "outside" / "o.safetensors")
    m = Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(paths[2]), ManifestEntry(outside)])
    save_manifest(m, d / "m.json")
    data = json.loads((d / "m.json").read_text(encoding="utf-8"))
    assert [e["path"] for e in data["models"]] == ["a.safetensors", "sub/c.safetensors", outside]
    assert data["version"] == 1


def test_default_fields_when_absent(folder):
    d, paths = folder
    src = write_json(d / "m.json", {"version": 1, "models": [{"path": "a.safetensors"}, {"path": "b.safetensors"}]})
    m = load_manifest(src)
    assert m == Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(paths[1])])
    assert (m.method, m.normalize, m.dtype, m.device, m.params, m.base) == ("weighted_sum", True, "fp16", "cpu", {}, None)
    assert isinstance(m.models[0].weight, float)
    assert m.entries is m.models


# ---------------------------------------------------------------------------------------------------------------
# path resolution


def test_relative_paths_resolve_against_manifest_folder_not_cwd(folder, tmp_path, monkeypatch):
    d, paths = folder
    src = write_json(
        d / "sub" / "m.json",
        {"version": 1, "models": [{"path": "../a.safetensors"}, {"path": "c.safetensors"}, {"path": "./../b.safetensors"}]},
    )
    monkeypatch.chdir(tmp_path)
    m = load_manifest(src)
    assert [e.path for e in m.models] == [paths[0], paths[2], paths[1]]
    validate(m)


def test_pasted_text_resolves_against_cwd_or_base_dir(folder, tmp_path, monkeypatch):
    d, paths = folder
    text = json.dumps({"version": 1, "models": [{"path": "a.safetensors"}, {"path": "sub/c.safetensors", "weight": 3}]})
    monkeypatch.chdir(d)
    m = load_manifest(text)
    assert [e.path for e in m.models] == [paths[0], paths[2]]
    assert m.path is None
    monkeypatch.chdir(tmp_path)
    m2 = load_manifest("\n  " + text, base_dir=d)
    assert m2 == m
    assert load_manifest(text.encode("utf-8"), base_dir=d) == m


def test_absolute_and_home_paths(folder, tmp_path, monkeypatch):
    d, paths = folder
    monkeypatch.setenv("HOME", str(d))
    monkeypatch.setenv("USERPROFILE", str(d))
    src = write_json(tmp_path / "m.json", {"version": 1, "models": [{"path": paths[1]}, {"path": "~/a.safetensors"}]})
    m = load_manifest(src)
    assert [e.path for e in m.models] == [paths[1], paths[0]]


# ---------------------------------------------------------------------------------------------------------------
# from a scan


def test_manifest_from_scan_equal_weights_and_save(folder):
    d, paths = folder
    r = scan([str(d / "**" / "*.safetensors")])
    m = manifest_from_scan(r)
    assert [e.path for e in m.models] == r.matches == sorted(paths)
    assert [e.weight for e in m.models] == [1.0, 1.0, 1.0]
    save_manifest(m, r.default_manifest_path)
    assert load_manifest(r.default_manifest_path) == m
    validate(m)


def test_manifest_from_scan_weights(folder):
    d, paths = folder
    r = scan([str(d / "*.safetensors")])
    assert manifest_from_scan(r, weights=[0.3, 0.7]).weights == [0.3, 0.7]
    assert manifest_from_scan(r, weights={"b.safetensors": 2}).weights == [1.0, 2.0]
    assert manifest_from_scan(r, weights={paths[0]: 5}, dtype="fp32").weights == [5.0, 1.0]
    assert manifest_from_scan(r.matches, dtype="bf16").dtype == "bf16"
    with pytest.raises(ManifestError, match="3 weights given for 2 models"):
        manifest_from_scan(r, weights=[1, 2, 3])
    with pytest.raises(ManifestError, match="zzz.safetensors"):
        manifest_from_scan(r, weights={"zzz.safetensors": 1})


# ---------------------------------------------------------------------------------------------------------------
# validation: each problem with its message (entry index and file name, field)


def load_text(d, obj):
    return load_manifest(json.dumps(obj) if not isinstance(obj, str) else obj, base_dir=d)


def two(extra_top=None, a=None, b=None):
    obj = {"version": 1, "models": [{"path": "a.safetensors", **(a or {})}, {"path": "b.safetensors", **(b or {})}]}
    obj.update(extra_top or {})
    return obj


def test_unknown_top_level_key(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two({"dtpye": "fp16"}))
    assert problems_of(e) == [
        "dtpye: unknown key (did you mean 'dtype'?); allowed keys: version, method, normalize, dtype, device, params,"
        " base, title, seed, allow_missing, nonfinite, key_layout, notes, models, loras"
    ]


def test_unknown_entry_key_names_entry(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two(b={"wieght": 2}))
    assert problems_of(e) == [
        "models[1] (b.safetensors): wieght: unknown key (did you mean 'weight'?); allowed keys: path, weight, sha256,"
        " notes, civitai"
    ]


def test_negative_weight(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two(a={"weight": -0.5}))
    assert problems_of(e) == ["models[0] (a.safetensors): weight: must be >= 0, got -0.5"]


@pytest.mark.parametrize("token,shown", [("NaN", "nan"), ("Infinity", "inf")])
def test_non_finite_weight(folder, token, shown):
    d, _ = folder
    text = '{"version": 1, "models": [{"path": "a.safetensors"}, {"path": "b.safetensors", "weight": %s}]}' % token
    m = load_text(d, text)
    with pytest.raises(ManifestValidationError) as e:
        validate(m)
    assert problems_of(e) == [f"models[1] (b.safetensors): weight: must be a finite number, got {shown}"]
    with pytest.raises(ManifestValidationError, match="finite"):
        save_manifest(m, d / "x.json")
    assert not os.path.exists(d / "x.json")


def test_weights_summing_to_zero(folder):
    d, _ = folder
    m = load_text(d, two(a={"weight": 0}, b={"weight": 0.0}))
    with pytest.raises(ManifestValidationError) as e:
        validate(m)
    assert problems_of(e) == [
        "models: the weights sum to 0, so they cannot be normalised; give at least one model a weight above 0"
    ]
    validate(dataclasses.replace(m, normalize=False))  # allowed without normalising


def test_fewer_than_two_models(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, {"version": 1, "models": [{"path": "a.safetensors"}]})
    assert problems_of(e) == ["models: a merge needs at least 2 models, got 1"]
    m = Manifest(models=[ManifestEntry(str(d / "a.safetensors"))])
    with pytest.raises(ManifestValidationError, match="at least 2 models, got 1"):
        validate(m)


def test_missing_file(folder):
    d, paths = folder
    m = load_text(d, two(b={"path": "gone.safetensors"}))
    with pytest.raises(ManifestValidationError) as e:
        validate(m)
    assert problems_of(e) == [f"models[1] (gone.safetensors): path: file not found: {d / 'gone.safetensors'}"]
    validate(m, check_files=False)  # nothing on disk is looked at


def test_folder_instead_of_file(folder):
    d, _ = folder
    os.makedirs(d / "dir.safetensors")
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two(b={"path": "dir.safetensors"})))
    assert problems_of(e) == [f"models[1] (dir.safetensors): path: {d / 'dir.safetensors'} is a folder, not a file"]


def test_non_safetensors_entry(folder):
    d, _ = folder
    (d / "old.ckpt").write_bytes(b"\x80\x02")
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two(b={"path": "old.ckpt"})), check_files=False)
    (msg,) = problems_of(e)
    assert msg.startswith("models[1] (old.ckpt): path: old.ckpt is not a .safetensors file: pickle format")


def test_duplicate_same_path(folder):
    d, _ = folder
    m = load_text(d, two(b={"path": "./sub/../a.safetensors"}))
    with pytest.raises(ManifestValidationError) as e:
        validate(m, check_files=False)
    assert problems_of(e) == [
        "models[1] (a.safetensors): path: same file as models[0] (a.safetensors) (listed twice); each file may appear once"
    ]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links here")
def test_duplicate_through_symlink(folder):
    d, paths = folder
    os.symlink(paths[0], d / "alias.safetensors")
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two(b={"path": "alias.safetensors"})))
    assert problems_of(e) == [
        "models[1] (alias.safetensors): path: same file as models[0] (a.safetensors) (through a symbolic link);"
        " each file may appear once"
    ]


def test_duplicate_hard_link(folder):
    d, paths = folder
    try:
        os.link(paths[0], d / "hard.safetensors")
    except OSError:
        pytest.skip("no hard links on this file system")
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two(b={"path": "hard.safetensors"})))
    assert problems_of(e) == [
        "models[1] (hard.safetensors): path: same file as models[0] (a.safetensors) (a hard link); each file may appear once"
    ]


def test_unknown_method(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two({"method": "frobnicate"})))
    (msg,) = problems_of(e)
    assert msg.startswith("method: unknown merge method 'frobnicate'; known: ")
    assert "weighted_sum" in msg


def test_unknown_parameter_for_method(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two({"params": {"alpha": 0.5}})))
    assert problems_of(e) == ["params: method 'weighted_sum' has no parameter 'alpha'; it takes: none"]
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two({"params": {"alpha": "x"}}))
    assert problems_of(e) == ['params.alpha: must be a number or a list of numbers, got "x"']


@pytest.mark.parametrize("dtype", ["fp8", "FP16", "float16", ""])
def test_bad_dtype(folder, dtype):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two({"dtype": dtype}))
    assert problems_of(e) == [f"dtype: {json.dumps(dtype)} is not one of fp16, bf16, fp32, keep, fp8_scaled"]


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CUDA", "cuda:0 ", "mps:0", "cpu,cuda"])
def test_bad_device_string(folder, device):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two({"device": device}))
    assert problems_of(e) == [f"device: {json.dumps(device)} is not a device; use cpu, cuda, cuda:N, mps or auto"]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:13", "mps", "auto"])
def test_device_format_only(folder, device):
    d, _ = folder
    validate(load_text(d, two({"device": device})))  # existence is checked when merging, not here


def test_bad_types_and_values(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two({"normalize": "yes", "seed": -1}, a={"weight": True, "sha256": "abc"}, b={"path": ""}))
    assert problems_of(e) == [
        'normalize: must be true or false, got "yes"',
        "seed: must be >= 0, got -1",
        'models[0] (a.safetensors): sha256: must be 64 hexadecimal digits (a SHA-256), got "abc"',
        "models[0] (a.safetensors): weight: must be a number, got true",
        "models[1]: path: must not be empty",
    ]
    assert str(e.value).startswith("manifest has 5 problems:\n  - normalize:")


def test_version_checks(folder):
    d, _ = folder
    obj = two()
    del obj["version"]
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, obj)
    assert problems_of(e) == ["version: missing (required)"]
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two({"version": 2}))
    assert problems_of(e) == ["version: version 2 is newer than this program reads (1); update model-merger"]
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, two({"version": "1"}))
    assert problems_of(e) == ['version: must be 1, got "1"']


def test_missing_path_and_not_an_object(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, {"version": 1, "models": [{"weight": 1}, "b.safetensors"]})
    assert problems_of(e) == ["models[0]: path: missing (required)", 'models[1]: must be a JSON object, got "b.safetensors"']
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, "[1, 2]")
    assert problems_of(e) == ["the manifest must be a JSON object, got [1, 2]"]


def test_duplicate_json_keys(folder):
    d, _ = folder
    text = '{"version": 1, "dtype": "fp16", "dtype": "fp32", "models": [{"path": "a.safetensors"}, {"path": "b.safetensors", "weight": 1, "weight": 2}]}'
    with pytest.raises(ManifestValidationError) as e:
        load_text(d, text)
    assert problems_of(e) == ["dtype: key given twice", "models[1] (b.safetensors): weight: key given twice"]


def test_invalid_json_names_line_and_column(folder):
    d, _ = folder
    p = d / "broken.json"
    p.write_text('{\n  "version": 1,\n  "models": [\n    {"path": "a.safetensors"}\n    {"path": "b"}\n  ]\n}\n')
    with pytest.raises(ManifestError) as e:
        load_manifest(p)
    assert str(e.value) == "broken.json: not valid JSON: Expecting ',' delimiter at line 5, column 5"


def test_file_level_errors(folder, tmp_path):
    d, paths = folder
    with pytest.raises(ManifestError, match="manifest file not found: .*nope.json"):
        load_manifest(tmp_path / "nope.json")
    with pytest.raises(ManifestError, match="a.safetensors is a model file, not a manifest"):
        load_manifest(paths[0])
    with pytest.raises(ManifestError, match="is a folder"):
        load_manifest(d)
    (tmp_path / "latin1.json").write_bytes(b'{"version": 1, "notes": "\xe9"}')
    with pytest.raises(ManifestError, match="latin1.json is not UTF-8 text"):
        load_manifest(tmp_path / "latin1.json")
    # a BOM (Windows Notepad) is accepted
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(two()).encode())
    assert len(load_manifest(tmp_path / "bom.json").models) == 2


def test_problems_from_file_name_the_file(folder):
    d, _ = folder
    src = write_json(d / "my.json", two(a={"weight": -1}))
    with pytest.raises(ManifestValidationError) as e:
        load_manifest(src)
    assert str(e.value) == "my.json: models[0] (a.safetensors): weight: must be >= 0, got -1"


def test_all_problems_reported_together_in_entry_order(folder):
    d, _ = folder
    m = load_text(d, {"version": 1, "models": [{"path": "gone1.safetensors"}, {"path": "b.safetensors"}, {"path": "gone2.safetensors"}]})
    m.models[1].weight = float("nan")
    m.method = "nope"
    with pytest.raises(ManifestValidationError) as e:
        validate(m)
    msgs = problems_of(e)
    assert len(msgs) == 4
    assert msgs[0].startswith("method: unknown merge method 'nope'")
    assert msgs[1].startswith("models[0] (gone1.safetensors): path: file not found")
    assert msgs[2] == "models[1] (b.safetensors): weight: must be a finite number, got nan"
    assert msgs[3].startswith("models[2] (gone2.safetensors): path: file not found")


def test_base_refused_for_method_without_base(folder):
    d, _ = folder
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two({"base": "sub/c.safetensors"})))
    assert problems_of(e) == ["base: method 'weighted_sum' does not use a base model; remove 'base'"]


# ---------------------------------------------------------------------------------------------------------------
# saving


def test_save_refuses_existing_without_overwrite(folder):
    d, paths = folder
    m = Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(paths[1])])
    target = d / "m.json"
    target.write_text("keep me")
    with pytest.raises(OutputError, match="exists"):
        save_manifest(m, target, overwrite=False)
    assert target.read_text() == "keep me"
    assert save_manifest(m, target) == str(target)
    assert load_manifest(target) == m


def test_save_into_missing_folder_or_onto_folder(folder, tmp_path):
    d, paths = folder
    m = Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(paths[1])])
    with pytest.raises(OutputError, match="does not exist"):
        save_manifest(m, tmp_path / "no" / "m.json")
    with pytest.raises(OutputError, match="is a folder"):
        save_manifest(m, d)


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="needs POSIX permissions and a non-root user")
def test_save_into_read_only_folder(folder, tmp_path):
    d, paths = folder
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="cannot write manifest"):
            save_manifest(Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(paths[1])]), ro / "m.json")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# ---------------------------------------------------------------------------------------------------------------
# to_plan and a real merge


def test_to_plan_and_merge_against_float64_reference(folder, tmp_path):
    import torch
    from safetensors.torch import load_file

    d, paths = folder
    src = write_json(
        d / "m.json",
        {
            "version": 1,
            "dtype": "fp32",
            "title": "three",
            "models": [
                {"path": "a.safetensors", "weight": 1, "sha256": SHA},
                {"path": "b.safetensors", "weight": 2},
                {"path": "sub/c.safetensors", "weight": 5},
            ],
        },
    )
    plan = plan_from_manifest(load_manifest(src))
    assert isinstance(plan, MergePlan)
    assert [i.path for i in plan.inputs] == paths
    assert [i.weight for i in plan.inputs] == [1.0, 2.0, 5.0]
    assert [i.name for i in plan.inputs] == ["a.safetensors", "b.safetensors", "c.safetensors"]
    assert plan.inputs[0].sha256 == SHA
    assert (plan.method, plan.normalize, plan.dtype, plan.device, plan.title) == ("weighted_sum", True, "fp32", "cpu", "three")
    out = tmp_path / "merged.safetensors"
    result = merge_to_file(plan, out)
    got = load_file(str(out))
    ref = (1 * 1.0 + 2 * 2.0 + 5 * 4.0) / 8  # float64 reference of the weighted mean of 1, 2, 4
    assert torch.allclose(got["model.w"].double(), torch.full((4, 3), ref, dtype=torch.float64), rtol=0, atol=1e-6)
    assert torch.equal(got["model.ids"], torch.arange(5))  # integers copied exactly
    assert "a.safetensors" in result.metadata["modelspec.merged_from"]
    assert str(d) not in json.dumps(result.metadata)  # no absolute paths in the metadata


def test_to_plan_overrides_and_validates(folder):
    d, paths = folder
    m = Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(paths[1])])
    plan = plan_from_manifest(m, device="auto", dtype="bf16")
    assert (plan.device, plan.dtype) == ("auto", "bf16")
    assert (m.device, m.dtype) == ("cpu", "fp16")  # the manifest itself is unchanged
    with pytest.raises(ManifestValidationError, match="device"):
        plan_from_manifest(m, device="gpu")
    with pytest.raises(ManifestValidationError, match="file not found"):
        plan_from_manifest(Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(str(d / "gone.safetensors"))]))


def test_to_plan_merge_to_state_dict_with_scan(folder):
    import torch
    from merger_core.merge.runner import merge_to_state_dict

    d, paths = folder
    m = manifest_from_scan(scan([str(d / "*.safetensors")]), weights=[3, 1], dtype="fp32")
    sd, _ = merge_to_state_dict(plan_from_manifest(m))
    assert torch.allclose(sd["model.w"].double(), torch.full((4, 3), (3 * 1.0 + 1 * 2.0) / 4, dtype=torch.float64))


def test_same_file_names_get_distinct_relative_display_names(tmp_path):
    a = st(tmp_path / "x" / "one" / "model.safetensors", 1.0)
    b = st(tmp_path / "x" / "two" / "model.safetensors", 3.0)
    assert display_names([a, b]) == ["one/model.safetensors", "two/model.safetensors"]
    plan = plan_from_manifest(Manifest(models=[ManifestEntry(a), ManifestEntry(b)]))
    assert [i.name for i in plan.inputs] == ["one/model.safetensors", "two/model.safetensors"]


def test_base_goes_first_for_a_method_that_takes_one(folder, monkeypatch):
    d, paths = folder

    class WithBase(methods_mod.MergeMethod):
        name = "test_with_base"
        kind = "linear"
        takes_base = True
        uses_weights = False

        def coefficients(self, weights, params):
            return [1.0] + [0.0] * (len(weights) - 1)

    monkeypatch.setitem(methods_mod.registry._REGISTRY, "test_with_base", WithBase())
    m = load_text(d, two({"method": "test_with_base", "base": "sub/c.safetensors"}))
    assert m.base == paths[2]
    plan = plan_from_manifest(m)
    assert [i.path for i in plan.inputs] == [paths[2], paths[0], paths[1]]
    assert plan.inputs[0].weight == 0.0
    assert plan.recipe == {"base_input": 0, "base": "c.safetensors"}
    # the base may not also be a model
    with pytest.raises(ManifestValidationError) as e:
        validate(load_text(d, two({"method": "test_with_base", "base": "a.safetensors"})))
    assert problems_of(e) == ["base: same file as models[0] (a.safetensors) (listed twice); the base cannot also be a model"]
    # round trip with a base
    save_manifest(m, d / "b.json")
    assert load_manifest(d / "b.json") == m
    assert json.loads((d / "b.json").read_text())["base"] == "sub/c.safetensors"


# ---------------------------------------------------------------------------------------------------------------
# the schema file and the documented example


def test_schema_is_a_valid_json_schema():
    import jsonschema

    schema = load_schema()
    jsonschema.validators.validator_for(schema).check_schema(schema)
    assert os.path.isfile(SCHEMA_PATH)
    assert schema["properties"]["version"]["const"] == 1


def test_documented_example_is_valid(tmp_path):
    doc = open(os.path.join(REPO, "docs", "manifest.md"), encoding="utf-8").read()
    blocks = re.findall(r"```json\n(.*?)```", doc, re.S)
    assert blocks, "docs/manifest.md has no json example"
    example = blocks[0]
    m = load_manifest(example, base_dir=tmp_path)
    for e in m.models:
        st(e.path)
    validate(m)
    assert manifest_to_json(m, relative_to=str(tmp_path)) == example


def test_failed_write_leaves_target_and_folder_untouched(folder, monkeypatch):
    import errno

    from merger_core.manifest import parse as manifest_mod

    d, paths = folder
    target = d / "m.json"
    target.write_text("old")
    before = sorted(os.listdir(d))

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_mod.os, "fsync", full_disk)
    with pytest.raises(OutputError, match="cannot write manifest .*No space left on device"):
        save_manifest(Manifest(models=[ManifestEntry(paths[0]), ManifestEntry(paths[1])]), target)
    assert target.read_text() == "old"
    assert sorted(os.listdir(d)) == before


def test_file_name_starting_with_bracket_is_a_file_and_empty_text_is_an_error(folder, monkeypatch):
    d, paths = folder
    src = write_json(d / "[pony] merge.json", two())
    monkeypatch.chdir(d)
    m = load_manifest("[pony] merge.json")
    assert m.path == str(d / "[pony] merge.json")
    assert [e.path for e in m.models] == paths[:2]
    with pytest.raises(ManifestError, match="the text is empty"):
        load_manifest("  \n")


def test_manifest_base_goes_first_for_base_methods(tmp_path):
    """A manifest's "base" becomes input 0 of task arithmetic / TIES / DARE, and the merge uses it as the base."""
    import torch
    from safetensors.torch import load_file, save_file

    from merger_core import merge_to_file

    g = torch.Generator().manual_seed(3)
    base = torch.randn(4096, generator=g)
    deltas = [torch.randn(4096, generator=g) * 0.1 for _ in range(2)]
    save_file({"k": base.half()}, str(tmp_path / "base.safetensors"))
    for i, d in enumerate(deltas):
        save_file({"k": (base + d).half()}, str(tmp_path / f"m{i}.safetensors"))
    (tmp_path / "m.json").write_text(json.dumps({
        "version": 1, "method": "task_arithmetic", "base": "base.safetensors", "params": {"scale": 0.5},
        "models": [{"path": "m0.safetensors"}, {"path": "m1.safetensors"}],
    }))
    plan = plan_from_manifest(load_manifest(str(tmp_path / "m.json")))
    assert [os.path.basename(i.path) for i in plan.inputs] == ["base.safetensors", "m0.safetensors", "m1.safetensors"]
    merge_to_file(plan, str(tmp_path / "out.safetensors"))
    out = load_file(str(tmp_path / "out.safetensors"))["k"].double()
    b = load_file(str(tmp_path / "base.safetensors"))["k"].double()
    ms = [load_file(str(tmp_path / f"m{i}.safetensors"))["k"].double() for i in range(2)]
    ref = b + 0.5 * sum(m - b for m in ms)
    assert (out - ref).abs().max().item() <= 2e-3
    assert (out - b).abs().max().item() > 0.01  # the deltas really were applied
