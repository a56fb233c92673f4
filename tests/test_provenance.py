"""Provenance (issue 12 item 8): every output's recipe names each input by SHA-256 and AutoV2, hashed in the run
when the cache does not know it, and keys ``sd_merge_models`` by those hashes as A1111 and Forge write it."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

import helpers
from merger_core.identity.cache import HashCache
from merger_core.merge.plan import MergeInput, MergePlan
from merger_core.merge.runner import merge_to_file
from merger_core.errors import MergeCancelled


def autov1(path) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


@pytest.fixture
def cache(tmp_path):
    c = HashCache(tmp_path / "cache.db")
    yield c
    c.close()


@pytest.fixture
def big_models(tmp_path):
    """Two models larger than 1 MiB (so they have an AutoV1)."""
    return helpers.write_models(tmp_path / "in", 2, dtype="F32")


def meta_of(path):
    header, _ = helpers.raw_header(path)
    return header["__metadata__"]


def test_recipe_records_each_inputs_sha256_autov2_and_autov1(big_models, out_dir, cache):
    out = out_dir / "m.safetensors"
    res = merge_to_file(helpers.plan_for(big_models, [0.3, 0.7]), out, cache=cache)
    meta = meta_of(out)
    want = [helpers.sha256_file(p) for p in big_models]
    recipe = json.loads(meta["sd_merge_recipe"])
    assert [m["sha256"] for m in recipe["models"]] == want
    assert [m["autov2"] for m in recipe["models"]] == [h[:10] for h in want]
    assert recipe["primary_model_hash"] == want[0] and recipe["secondary_model_hash"] == want[1]
    models = json.loads(meta["sd_merge_models"])
    assert list(models) == want  # keyed by SHA-256, in input order
    assert [v["legacy_hash"] for v in models.values()] == [autov1(p) for p in big_models]
    assert [v["name"] for v in models.values()] == [os.path.basename(p) for p in big_models]
    replay = json.loads(meta["model_merger.replay"])
    assert [x["sha256"] for x in replay["inputs"]] == want
    assert [x["size"] for x in replay["inputs"]] == [os.path.getsize(p) for p in big_models]
    assert "@" not in meta["sd_merge_recipe"] + meta["sd_merge_models"]  # no placeholder left
    assert res.metadata["sd_merge_recipe"] == meta["sd_merge_recipe"]  # the result reports what was written
    assert "sha256" in json.loads(meta["model_merger.manifest"])["models"][0]
    # hashed in the run, so now in the cache
    assert [cache.lookup(p, ("sha256",)).sha256 for p in big_models] == want


def test_same_bytes_whether_the_hashes_come_from_the_cache_or_the_run(big_models, tmp_path, cache):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    merge_to_file(helpers.plan_for(big_models), tmp_path / "a" / "m.safetensors", cache=cache)  # hashes computed
    assert cache.lookup(big_models[0], ("sha256",)) is not None
    merge_to_file(helpers.plan_for(big_models), tmp_path / "b" / "m.safetensors", cache=cache)  # from the cache
    assert helpers.sha256_file(tmp_path / "a" / "m.safetensors") == helpers.sha256_file(tmp_path / "b" / "m.safetensors")


def test_no_input_hashes_records_only_what_the_cache_knows(big_models, out_dir, cache):
    merge_to_file(helpers.plan_for(big_models), out_dir / "a.safetensors", cache=cache, input_hashes=False)
    recipe = json.loads(meta_of(out_dir / "a.safetensors")["sd_merge_recipe"])
    assert [m["sha256"] for m in recipe["models"]] == [None, None]
    assert cache.lookup(big_models[0], ("sha256",)) is None  # nothing was hashed
    cache.hashes(big_models[0], ("sha256",))
    merge_to_file(helpers.plan_for(big_models), out_dir / "b.safetensors", cache=cache, input_hashes=False)
    recipe = json.loads(meta_of(out_dir / "b.safetensors")["sd_merge_recipe"])
    assert [m["sha256"] for m in recipe["models"]] == [helpers.sha256_file(big_models[0]), None]


def test_a_wrong_sha256_in_the_manifest_is_not_recorded(big_models, out_dir, cache):
    plan = MergePlan(inputs=[MergeInput(big_models[0], 1.0, sha256="ab" * 32), MergeInput(big_models[1], 1.0)])
    res = merge_to_file(plan, out_dir / "m.safetensors", cache=cache)
    recipe = json.loads(meta_of(out_dir / "m.safetensors")["sd_merge_recipe"])
    assert recipe["models"][0]["sha256"] == helpers.sha256_file(big_models[0])
    assert any("manifest's sha256" in n for n in res.notes)


def test_the_inputs_own_recipes_are_carried_on(tmp_path, out_dir, cache):
    parent = {"abc" * 21 + "d": {"name": "grandparent.safetensors", "legacy_hash": None, "sd_merge_recipe": None}}
    own = {"type": "webui", "interp_method": "Weighted sum"}
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1,
                            metadata={"sd_merge_recipe": json.dumps(own), "sd_merge_models": json.dumps(parent)})
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2)
    merge_to_file(helpers.plan_for([a, b]), out_dir / "m.safetensors", cache=cache)
    models = json.loads(meta_of(out_dir / "m.safetensors")["sd_merge_models"])
    ha, hb = helpers.sha256_file(a), helpers.sha256_file(b)
    assert list(models) == [ha, "abc" * 21 + "d", hb]
    assert models[ha]["sd_merge_recipe"] == own


def test_a_cancelled_merge_stops_the_hashing_and_leaves_nothing(big_models, out_dir, cache):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(MergeCancelled):
        merge_to_file(helpers.plan_for(big_models), out_dir / "m.safetensors", cache=cache, cancel=cancel)
    assert os.listdir(out_dir) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("model-merger-input-hash")]
