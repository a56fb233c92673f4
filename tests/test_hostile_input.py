"""Issue 11's cases of bad input that used to hang, crash or give wrong results without a word: special files,
duplicate tensor names, inputs changing under a merge, weights that overflow, integer/float mixes, the free-disk
message and manifest validation that grew with the square of the models."""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from merger_core.cli import main
from merger_core.errors import BadFileError, IncompatibleModelsError, ManifestError, OutputError
from merger_core.identity.hashing import hash_file
from merger_core.io.safetensors import read_header
from merger_core.manifest import Manifest, ManifestEntry, load_manifest, validate
from merger_core.manifest.scan import scan
from merger_core.merge.plan import MergeInput, MergePlan, prepare
from merger_core.merge.runner import merge_to_file

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")


def _promptly(fn, fifo=None, seconds=20.0):
    """Run ``fn`` in a thread; fail (instead of hanging) when it is still blocked after ``seconds``."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:  # let the blocked reader go
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        pytest.fail(f"{getattr(fn, '__name__', fn)} blocked on a special file")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------------------------------------------- special files


@posix_only
def test_a_fifo_as_input_or_manifest_is_refused_without_blocking(tmp_path):
    fifo = str(tmp_path / "pipe.safetensors")
    os.mkfifo(fifo)
    with pytest.raises(BadFileError, match="named pipe"):
        _promptly(lambda: read_header(fifo), fifo)
    manifest_fifo = str(tmp_path / "manifest.json")
    os.mkfifo(manifest_fifo)
    with pytest.raises(ManifestError, match="named pipe"):
        _promptly(lambda: load_manifest(manifest_fifo), manifest_fifo)
    good = helpers.write_model(tmp_path / "good.safetensors")
    with pytest.raises(ManifestError, match="named pipe"):
        _promptly(lambda: validate(Manifest([ManifestEntry(good), ManifestEntry(fifo)])), fifo)


@posix_only
def test_a_link_to_a_device_is_refused_by_hash_and_lookup(tmp_path, capsys):
    link = tmp_path / "zero.safetensors"
    os.symlink("/dev/zero", link)
    with pytest.raises(BadFileError, match="character device"):
        _promptly(lambda: hash_file(str(link), "sha256"))
    for argv in (["hash", str(link)], ["hash", "--no-cache", str(link)], ["lookup", "--offline", str(link)]):
        rc = _promptly(lambda: main(argv))
        err = capsys.readouterr().err
        assert rc != 0 and "character device" in err and "Traceback" not in err, (argv, err)


@posix_only
def test_scan_skips_fifos_and_device_links_with_the_reason(tmp_path):
    good = helpers.write_model(tmp_path / "good.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.symlink("/dev/null", tmp_path / "null.safetensors")
    res = _promptly(lambda: scan([str(tmp_path)]))
    assert res.matches == [os.path.abspath(good)]
    reasons = dict(res.skipped)
    assert "named pipe" in reasons[str(tmp_path / "pipe.safetensors")]
    assert "character device" in reasons[str(tmp_path / "null.safetensors")]


# ------------------------------------------------------------------------------------------------- headers


def test_a_tensor_named_twice_in_a_header_is_refused(tmp_path):
    entry = json.dumps(helpers.tensor_entry("F16", [2], 0))
    raw = ('{"a.weight": %s, "b.weight": %s, "a.weight": %s}' % (entry, entry, entry)).encode()
    p = helpers.write_raw(tmp_path / "twice.safetensors", {}, data=b"\0" * 8, raw_json=raw)
    with pytest.raises(BadFileError, match="names 'a.weight' twice"):
        read_header(p)


# ------------------------------------------------------------------------------------------------- changing inputs


def test_an_input_rewritten_in_place_during_the_merge_gives_no_output(tmp_path, out_dir):
    """Same size, new bytes: without the check the merge exits 0 with a mix of old and new tensors."""
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2)
    replacement = helpers.write_model(tmp_path / "b2.safetensors", seed=7)
    calls = []

    def progress(info):
        calls.append(info.keys_done)
        if len(calls) == 10:  # a tenth of the way in, b is replaced by other bytes of the same size
            with open(replacement, "rb") as src, open(b, "r+b") as dst:
                dst.write(src.read())
            st = os.stat(b)
            os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))

    out = out_dir / "merged.safetensors"
    with pytest.raises(BadFileError, match="b.safetensors changed while it was being merged"):
        merge_to_file(helpers.plan_for([a, b]), out, progress=progress)
    assert not out.exists() and helpers.leftovers(out_dir) == []


def test_an_input_truncated_between_keys_is_a_clear_error_not_a_crash(tmp_path, out_dir):
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2)

    def progress(info):
        if info.keys_done == 5:
            os.truncate(b, os.path.getsize(b) // 2)

    out = out_dir / "merged.safetensors"
    with pytest.raises(BadFileError, match=r"b.safetensors changed .*size changed"):
        merge_to_file(helpers.plan_for([a, b]), out, progress=progress)
    assert not out.exists() and helpers.leftovers(out_dir) == []


# ------------------------------------------------------------------------------------------------- values


def test_weights_whose_sum_overflows_are_refused(tmp_path, out_dir):
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2)
    with pytest.raises(ManifestError, match="not a finite number"):
        validate(Manifest([ManifestEntry(a, 1e308), ManifestEntry(b, 1e308)]))
    with pytest.raises(ManifestError, match="not a finite number"):
        prepare(MergePlan([MergeInput(a, 1e308), MergeInput(b, 1e308)]))
    assert os.listdir(out_dir) == []


def test_a_key_that_is_integer_in_one_model_and_float_in_another_is_refused(tmp_path):
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    b_path = str(tmp_path / "b.safetensors")
    tensors = load_file(helpers.write_model(tmp_path / "b0.safetensors", seed=2))
    tensors[helpers.KEY_POSITION_IDS] = tensors[helpers.KEY_POSITION_IDS].to(torch.float16)
    save_file(tensors, b_path)
    for order in ([a, b_path], [b_path, a]):
        with pytest.raises(IncompatibleModelsError, match=r"position_ids holds integers in some models and floats"):
            prepare(helpers.plan_for(order))
    with pytest.raises(IncompatibleModelsError, match=r"a.safetensors I64, b.safetensors F16"):
        prepare(helpers.plan_for([a, b_path]))


def test_the_free_disk_refusal_says_the_real_numbers_and_the_margin(tmp_path, out_dir, monkeypatch):
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2)
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10 ** 9, 10 ** 9 - 5 * 2 ** 20, 5 * 2 ** 20))
    with pytest.raises(OutputError) as err:
        merge_to_file(helpers.plan_for([a, b]), out_dir / "merged.safetensors")
    msg = str(err.value)
    assert "needs 2.41 MiB" in msg and "16.00 MiB are kept free" in msg and "5.00 MiB" in msg, msg
    assert "0.00 GiB" not in msg


# ------------------------------------------------------------------------------------------------- scale


def test_manifest_validation_is_linear_in_the_number_of_models(tmp_path, monkeypatch):
    """Duplicates are found through tables, one real path per entry (it was two per pair of entries)."""
    folder = tmp_path / "many"
    folder.mkdir()
    entries = []
    for i in range(400):
        p = folder / f"m{i:04d}.safetensors"
        p.write_bytes(b"")
        entries.append(ManifestEntry(str(p), 1.0))
    calls = []
    real = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, *a, **k: (calls.append(p), real(p, *a, **k))[1])
    validate(Manifest(entries))
    assert len(calls) <= 2 * len(entries), len(calls)
    # and duplicates are still found, naming the first entry
    dup = Manifest(entries[:3] + [ManifestEntry(entries[1].path, 1.0)])
    with pytest.raises(ManifestError, match=r"same file as models\[1\]"):
        validate(dup)
