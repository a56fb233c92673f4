"""``model-merger verify`` (issue 12 item 9): re-run the recorded merge to a comparing sink. It verifies the outputs
of every planner and method, fails on a file with one changed tensor, and refuses clearly when it cannot run."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

import helpers
from merger_core.cli import main
from merger_core.identity.cache import open_cache
from merger_core.manifest.model import Manifest, ManifestEntry
from merger_core.merge.cross import CrossMergeRequest, cross_merge_to_file
from merger_core.merge.plan import plan_from_manifest
from merger_core.merge.runner import merge_to_file
from merger_core.merge.train import plan_difference
from merger_core.merge.verify import VerifyError, verify_file


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh user data folder (hash cache) per test, so one test's hashes do not find another's files."""
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))


@pytest.fixture
def models(make_models):
    return make_models(3)


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out + err


def manifest_merge(paths, out, method="weighted_sum", base=None, params=None, weights=None, **kw):
    m = Manifest(models=[ManifestEntry(p, w) for p, w in zip(paths, weights or [1.0] * len(paths))], method=method,
                 base=base, params=params or {}, **kw)
    merge_to_file(plan_from_manifest(m), out)
    return out


CASES = {
    "weighted_sum": lambda p, o: manifest_merge(p, o, weights=[0.2, 0.3, 0.5]),
    "add_difference": lambda p, o: manifest_merge(p, o, "add_difference", params={"alpha": 0.7}),
    "ties": lambda p, o: manifest_merge(p[1:], o, "ties", base=p[0], params={"density": 0.4}, seed=7),
    "dare": lambda p, o: manifest_merge(p[1:], o, "dare", base=p[0], params={"drop": 0.6}, seed=11),
    "slerp": lambda p, o: manifest_merge(p[:2], o, "slerp", params={"t": 0.3}, dtype="bf16"),
    "train_difference": lambda p, o: merge_to_file(plan_difference("train_difference", *p, alpha=0.8), o),
    "train_difference_blocks": lambda p, o: merge_to_file(
        plan_difference("train_difference", *p, alpha=1.0, alpha_blocks="*=0.5,OUT=1"), o),
    "plan": lambda p, o: merge_to_file(helpers.plan_for(p, [1, 2, 3], nonfinite="clamp"), o),
    "fp8_scaled": lambda p, o: manifest_merge(p, o, dtype="fp8_scaled"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_passes_on_outputs_of_every_method(case, models, out_dir, capsys, monkeypatch):
    # the small SD1-named layout is too small for the detector; per-block alpha needs only the SD1 block map
    monkeypatch.setattr("merger_core.merge.train.detect_arch", lambda path: "sd1")
    out = out_dir / f"{case}.safetensors"
    CASES[case](models, out)
    rc, text = run_cli(capsys, "verify", out, "--no-progress")
    assert rc == 0, text
    assert "verified: all" in text


def cross_family(tmp_path):
    import test_crossmerge as T

    base_paths, model_paths, _, _ = T.make_family(tmp_path / "fam", 2)
    return base_paths[0], model_paths


@pytest.mark.parametrize("combine", ["sum", "ties", "dare"])
def test_verify_passes_on_cross_merges(combine, tmp_path, out_dir):
    base, paths = cross_family(tmp_path)
    out = out_dir / "x.safetensors"
    cross_merge_to_file(CrossMergeRequest(paths, base=base, combine=combine, scale=0.8, scale_blocks="*=0.5,OUT=1",
                                          seed=3, vae="model:2"), str(out))
    res = verify_file(out)
    assert res.verified, res.detail
    assert res.planner == "cross_merge" and res.checked_keys == res.keys


def flip_one_tensor(path, key):
    header, n = helpers.raw_header(path)
    begin = header[key]["data_offsets"][0]
    with open(path, "r+b") as f:
        f.seek(8 + n + begin)
        b = f.read(2)
        f.seek(8 + n + begin)
        f.write(bytes([b[0] ^ 0x01, b[1]]))


def test_verify_names_the_one_changed_tensor(models, out_dir, capsys):
    out = manifest_merge(models, out_dir / "m.safetensors")
    key = helpers.KEY_OUT
    flip_one_tensor(out, key)
    rc, text = run_cli(capsys, "verify", out, "--no-progress")
    assert rc == 1
    assert f"differs: {key}" in text and "byte 0 " in text


def test_verify_catches_an_edited_tensor_hash(models, out_dir):
    out = manifest_merge(models, out_dir / "m.safetensors")
    header, n = helpers.raw_header(out)
    stored = header["__metadata__"]["modelspec.hash_sha256"]
    blob = open(out, "rb").read()
    blob = blob.replace(stored.encode(), ("0x" + "1" * 64).encode(), 1)
    open(out, "wb").write(blob)
    res = verify_file(out)
    assert not res.verified and "metadata was edited" in res.detail


def test_verify_catches_a_changed_weight_in_the_record(models, out_dir):
    out = manifest_merge(models, out_dir / "m.safetensors", weights=[0.2, 0.3, 0.5])
    blob = open(out, "rb").read()
    assert blob.count(b'\\"weight\\": 0.5') >= 1
    with open(out, "wb") as f:  # same length: the header keeps its size
        f.write(blob.replace(b'{\\"path\\": 2, \\"weight\\": 0.5}', b'{\\"path\\": 2, \\"weight\\": 0.6}'))
    res = verify_file(out)
    assert not res.verified and res.first_difference is not None


def test_an_input_moved_elsewhere_is_found_with_search(models, out_dir, tmp_path, capsys):
    out = manifest_merge(models, out_dir / "m.safetensors")
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    for p in models:
        shutil.move(p, moved / os.path.basename(p))
    rc, text = run_cli(capsys, "verify", out, "--no-progress")
    assert rc == 2
    assert "cannot find model-0.safetensors" in text and "--search" in text and "Traceback" not in text
    rc, text = run_cli(capsys, "verify", out, "--search", tmp_path / "elsewhere", "--no-progress")
    assert rc == 0, text


def test_an_input_found_by_hash_under_another_name(models, out_dir, tmp_path):
    out = manifest_merge(models, out_dir / "m.safetensors")
    other = tmp_path / "renamed"
    other.mkdir()
    for i, p in enumerate(models):
        shutil.copy(p, other / f"copy{i}.safetensors")
        os.unlink(p)
    open_cache().forget(models[0])
    res = verify_file(out, [other])
    assert res.verified
    assert [os.path.basename(x["path"]) for x in res.inputs] == ["copy0.safetensors", "copy1.safetensors", "copy2.safetensors"]


def test_a_same_size_file_with_other_bytes_is_not_taken(models, out_dir, tmp_path):
    out = manifest_merge(models, out_dir / "m.safetensors")
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    helpers.write_model(decoy / "model-0.safetensors", seed=99, offset=-0.25 * 1.5)  # same layout, other values
    assert os.path.getsize(decoy / "model-0.safetensors") == os.path.getsize(models[0])
    os.unlink(models[0])
    with pytest.raises(VerifyError, match="cannot find model-0.safetensors"):
        verify_file(out, [decoy])


def test_refuses_a_file_merged_without_input_hashes(models, out_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home2"))
    out = out_dir / "m.safetensors"
    merge_to_file(helpers.plan_for(models), out, input_hashes=False)
    rc, text = run_cli(capsys, "verify", out, "--no-progress")
    assert rc == 2 and "--no-input-hashes" in text


def test_refuses_a_file_not_written_by_model_merger(tmp_path, capsys):
    p = helpers.write_model(tmp_path / "plain.safetensors")
    rc, text = run_cli(capsys, "verify", p, "--no-progress")
    assert rc == 2 and "holds no model-merger record" in text


def test_a_damaged_record_is_refused_clearly(models, out_dir):
    out = manifest_merge(models, out_dir / "m.safetensors")
    blob = open(out, "rb").read()
    with open(out, "wb") as f:
        f.write(blob.replace(b'\\"planner\\": \\"manifest\\"', b'\\"planner\\": \\"nonsense\\"'))
    with pytest.raises(VerifyError, match="damaged"):
        verify_file(out)


def test_verify_writes_nothing(models, out_dir):
    out = manifest_merge(models, out_dir / "m.safetensors")
    before = sorted(os.listdir(out_dir)), helpers.hashes(models + [str(out)])
    assert verify_file(out).verified
    assert (sorted(os.listdir(out_dir)), helpers.hashes(models + [str(out)])) == before


def test_the_command_line_merge_records_hashes_and_verifies(models, tmp_path, out_dir, capsys):
    m = Manifest(models=[ManifestEntry(p, 1.0) for p in models], method="weighted_sum")
    from merger_core.manifest.parse import save_manifest

    man = save_manifest(m, tmp_path / "manifest.json")
    rc, text = run_cli(capsys, "merge", man, "-o", out_dir / "a.safetensors", "--no-progress", "--dtype", "bf16")
    assert rc == 0, text
    assert run_cli(capsys, "verify", out_dir / "a.safetensors", "--no-progress")[0] == 0
    rc, text = run_cli(capsys, "train-diff", *models, "-o", out_dir / "t.safetensors", "--no-progress", "--alpha", "0.5")
    assert rc == 0, text
    assert run_cli(capsys, "verify", out_dir / "t.safetensors", "--no-progress")[0] == 0


def test_no_input_hashes_on_the_command_line(models, tmp_path, out_dir, capsys):
    m = Manifest(models=[ManifestEntry(p, 1.0) for p in models], method="weighted_sum")
    from merger_core.manifest.parse import save_manifest

    man = save_manifest(m, tmp_path / "manifest.json")
    rc, text = run_cli(capsys, "merge", man, "-o", out_dir / "a.safetensors", "--no-progress", "--no-input-hashes")
    assert rc == 0, text
    recipe = json.loads(helpers.raw_header(out_dir / "a.safetensors")[0]["__metadata__"]["sd_merge_recipe"])
    assert [x["sha256"] for x in recipe["models"]] == [None] * 3
