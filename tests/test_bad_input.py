"""Bad input and failures halfway: each must give a clear error naming the problem, leave no output and no
temporary file behind, and leave the inputs byte-for-byte unchanged."""

from __future__ import annotations

import errno
import os
import struct

import pytest

import helpers
from merger_core.merge.runner import merge_to_file
from merger_core.merge.plan import plan_from_manifest, prepare
from merger_core.errors import BadFileError, IncompatibleModelsError, ManifestError, MergeCancelled, ModelMergerError, OutputError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture
def setup(make_models, out_dir):
    """Two good models, a hash of every input, and a checker that nothing was left behind."""

    class S:
        paths = make_models(2)
        out = out_dir / "merged.safetensors"

        def __init__(self):
            self.before = helpers.hashes(self.paths)

        def add(self, path):
            self.paths = [*self.paths, os.fspath(path)]
            if os.path.isfile(path):
                self.before[os.fspath(path)] = helpers.sha256_file(path)
            return os.fspath(path)

        def merge(self, overwrite=False, **kw):
            weights = kw.pop("weights", None)
            return merge_to_file(helpers.plan_for(self.paths, weights, **kw), self.out, overwrite=overwrite)

        def assert_clean(self, folder=None, expect_files=()):
            folder = folder or out_dir
            assert sorted(os.listdir(folder)) == sorted(expect_files), os.listdir(folder)
            assert helpers.leftovers(folder) == []
            assert helpers.hashes(p for p in self.before) == self.before

    return S()


def fails(setup, exc_type, *words, **kw):
    with pytest.raises(exc_type) as info:
        setup.merge(**kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    setup.assert_clean()
    return msg


def small_file(path, mutate=None, raw_json=None, data_len=None):
    """A hand-made two-tensor safetensors file; ``mutate(header)`` breaks it."""
    header = {
        "a.weight": helpers.tensor_entry("F16", (4, 4), 0),
        "b.bias": helpers.tensor_entry("F32", (4,), 32),
    }
    if mutate:
        mutate(header)
    data = b"\x01" * (48 if data_len is None else data_len)
    return helpers.write_raw(path, header, data, raw_json=raw_json)


# ---------------------------------------------------------------------------------------------------------------
# Broken input files


def test_truncated_file(setup, tmp_path):
    p = setup.add(helpers.write_model(tmp_path / "in" / "cut.safetensors", seed=3))
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size * 6 // 10)
    setup.before[p] = helpers.sha256_file(p)
    fails(setup, BadFileError, "cut.safetensors", "outside the data section", "truncated")


def test_truncated_by_one_byte(setup, tmp_path):
    p = setup.add(helpers.write_model(tmp_path / "in" / "short.safetensors", seed=3))
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 1)
    setup.before[p] = helpers.sha256_file(p)
    fails(setup, BadFileError, "short.safetensors", "truncated")


def test_header_length_past_end(setup, tmp_path):
    p = setup.add(small_file(tmp_path / "in" / "longhdr.safetensors"))
    with open(p, "r+b") as f:
        f.write(struct.pack("<Q", 4096))
    setup.before[p] = helpers.sha256_file(p)
    fails(setup, BadFileError, "longhdr.safetensors", "header length 4096 runs past the end")


def test_implausible_header_length(setup, tmp_path):
    p = setup.add(helpers.write_raw(tmp_path / "in" / "huge.safetensors", {}, b"", header_len=2**62))
    fails(setup, BadFileError, "huge.safetensors", "not plausible")


def test_too_short(setup, tmp_path):
    p = tmp_path / "in" / "tiny.safetensors"
    p.write_bytes(b"abc")
    setup.add(p)
    fails(setup, BadFileError, "tiny.safetensors", "too short")


def test_invalid_header_json(setup, tmp_path):
    setup.add(small_file(tmp_path / "in" / "badjson.safetensors", raw_json=b'{"a.weight": {"dtype": "F16",'))
    fails(setup, BadFileError, "badjson.safetensors", "not valid JSON")


def test_header_not_utf8(setup, tmp_path):
    setup.add(small_file(tmp_path / "in" / "latin.safetensors", raw_json=b'{"\xff": 1}'))
    fails(setup, BadFileError, "latin.safetensors", "not valid JSON")


def test_offsets_out_of_range(setup, tmp_path):
    def mutate(h):
        h["b.bias"]["data_offsets"] = [32, 4000]

    setup.add(small_file(tmp_path / "in" / "range.safetensors", mutate))
    fails(setup, BadFileError, "range.safetensors", "'b.bias'", "outside the data section")


def test_offsets_negative(setup, tmp_path):
    def mutate(h):
        h["a.weight"]["data_offsets"] = [-8, 24]

    setup.add(small_file(tmp_path / "in" / "neg.safetensors", mutate))
    fails(setup, BadFileError, "neg.safetensors", "'a.weight'")


def test_overlapping_offsets(setup, tmp_path):
    def mutate(h):
        h["b.bias"]["data_offsets"] = [16, 32]  # inside a.weight's [0, 32)

    setup.add(small_file(tmp_path / "in" / "overlap.safetensors", mutate))
    fails(setup, BadFileError, "overlap.safetensors", "overlap")


def test_offsets_disagree_with_shape(setup, tmp_path):
    def mutate(h):
        h["a.weight"]["shape"] = [4, 5]

    setup.add(small_file(tmp_path / "in" / "size.safetensors", mutate))
    fails(setup, BadFileError, "size.safetensors", "'a.weight'", "needs 40 bytes")


def test_unknown_dtype(setup, tmp_path):
    def mutate(h):
        h["a.weight"]["dtype"] = "F12"

    setup.add(small_file(tmp_path / "in" / "dtype.safetensors", mutate))
    fails(setup, BadFileError, "dtype.safetensors", "unknown dtype 'F12'")


def test_bad_shape_entry(setup, tmp_path):
    def mutate(h):
        h["a.weight"]["shape"] = [4, -4]

    setup.add(small_file(tmp_path / "in" / "shape.safetensors", mutate))
    fails(setup, BadFileError, "shape.safetensors", "invalid shape")


def test_not_a_safetensors_file_at_all(setup, tmp_path):
    p = tmp_path / "in" / "text.safetensors"
    p.write_text("this is a readme, not a model\n" * 20)
    setup.add(p)
    fails(setup, BadFileError, "text.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Inputs that do not fit together


def test_key_mismatch(setup, tmp_path):
    setup.add(helpers.write_model(tmp_path / "in" / "fewer.safetensors", seed=4,
                                  drop=[helpers.KEY_CONV_IN, helpers.KEY_OUT]))
    msg = fails(setup, IncompatibleModelsError, "fewer.safetensors lacks 2 of 1131 keys", helpers.KEY_CONV_IN,
                "--allow-missing")
    assert helpers.KEY_OUT in msg


def test_many_missing_keys_are_summarised(setup, tmp_path):
    drop = [k for k in helpers.small_layout() if k.startswith("first_stage_model.")]  # no VAE
    setup.add(helpers.write_model(tmp_path / "in" / "novae.safetensors", seed=4, drop=drop))
    msg = fails(setup, IncompatibleModelsError, f"novae.safetensors lacks {len(drop)} of 1131 keys",
                f"and {len(drop) - 5} more")
    assert len(msg) < 2000


def test_shape_mismatch(setup, tmp_path):
    setup.add(helpers.write_model(tmp_path / "in" / "wide.safetensors", seed=4,
                                  reshape={helpers.KEY_CONV_IN: (16, 4, 3, 3)}))
    msg = fails(setup, IncompatibleModelsError, "1 keys differ in shape", helpers.KEY_CONV_IN, "[16, 4, 3, 3]",
                "[8, 4, 3, 3]")
    # a shape mismatch cannot be allowed away
    fails(setup, IncompatibleModelsError, "differ in shape", allow_missing=True)
    assert "allow-missing" not in msg


# ---------------------------------------------------------------------------------------------------------------
# Weights (engine level; the manifest's own validation is tested with the manifest)


@pytest.mark.parametrize(
    "weights, words",
    [
        ([float("nan"), 1.0], "weight nan is not a finite number"),
        ([1.0, float("inf")], "is not a finite number"),
        ([0.5, -0.5], "sum to 0"),
        ([0.0, 0.0], "sum to 0"),
    ],
)
def test_bad_weights(setup, weights, words):
    fails(setup, ManifestError, words, weights=weights)


def test_manifest_rejects_bad_weights(setup, tmp_path):
    from merger_core.manifest.parse import load_manifest

    p = tmp_path / "m.json"
    for w1, words in (("NaN", "must be a finite number"), ("Infinity", "must be a finite number"),
                      ("-1.0", "must be >= 0"), ("0.0", "sum to 0")):
        p.write_text(
            '{"version": 1, "method": "weighted_sum", "models": [{"path": "%s", "weight": %s}, '
            '{"path": "%s", "weight": %s}]}' % (setup.paths[0], "0.0" if w1 == "0.0" else "1.0", setup.paths[1], w1)
        )
        with pytest.raises(ManifestError) as info:
            plan_from_manifest(load_manifest(str(p)))
        msg = str(info.value)
        assert words in msg, msg
        if w1 != "0.0":
            assert "models[1] (model-1.safetensors)" in msg and "weight" in msg, msg
    setup.assert_clean()


# ---------------------------------------------------------------------------------------------------------------
# Inputs that cannot be read


def test_missing_input(setup, tmp_path):
    setup.paths = [setup.paths[0], str(tmp_path / "in" / "gone.safetensors")]
    fails(setup, BadFileError, "gone.safetensors", "not found")


def test_folder_in_place_of_input(setup, tmp_path):
    d = tmp_path / "in" / "folder.safetensors"
    d.mkdir()
    setup.paths = [setup.paths[0], str(d)]
    fails(setup, BadFileError, "folder.safetensors", "is a folder")


def test_unreadable_input(setup, not_root):
    os.chmod(setup.paths[1], 0)
    try:
        with pytest.raises(BadFileError, match="model-1.safetensors: permission denied"):
            setup.merge()
    finally:
        os.chmod(setup.paths[1], 0o644)
    setup.assert_clean()


# ---------------------------------------------------------------------------------------------------------------
# Outputs that cannot be written


def test_existing_output_is_refused_and_untouched(setup):
    setup.out.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists.*--overwrite"):
        setup.merge()
    assert setup.out.read_bytes() == b"precious"
    setup.assert_clean(expect_files=["merged.safetensors"])


def test_overwrite_replaces_existing_output(setup):
    setup.out.write_bytes(b"old")
    setup.merge(overwrite=True)
    assert setup.out.read_bytes()[:8] != b"old"
    setup.assert_clean(expect_files=["merged.safetensors"])


def test_output_folder_missing(setup, tmp_path):
    out = tmp_path / "nowhere" / "merged.safetensors"
    with pytest.raises(OutputError, match="does not exist"):
        merge_to_file(helpers.plan_for(setup.paths), out)
    assert not (tmp_path / "nowhere").exists()
    setup.assert_clean()


def test_output_folder_is_a_file(setup, tmp_path):
    blocker = tmp_path / "out" / "afile"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="afile"):
        merge_to_file(helpers.plan_for(setup.paths), blocker / "merged.safetensors")
    setup.assert_clean(expect_files=["afile"])
    assert blocker.read_text() == "x"


def test_output_is_a_folder(setup, tmp_path):
    (tmp_path / "out" / "merged.safetensors").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, overwrite=True)
    setup.assert_clean(expect_files=["merged.safetensors"])


def test_unwritable_output_folder(setup, tmp_path, not_root):
    os.chmod(tmp_path / "out", 0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            setup.merge()
    finally:
        os.chmod(tmp_path / "out", 0o755)
    setup.assert_clean()


def test_output_that_cannot_be_created_even_as_root(setup, tmp_path):
    """A file name longer than the file system allows (ENAMETOOLONG, 255 bytes on common Linux file systems):
    a real failure to create the file that happens as root too. The error must name the output."""
    name = "m" * 260 + ".safetensors"
    out = tmp_path / "out" / name
    with pytest.raises(OutputError) as info:
        merge_to_file(helpers.plan_for(setup.paths), out)
    assert name in str(info.value) and "too long" in str(info.value).lower()
    setup.assert_clean()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_unwritable_output_folder_even_as_root(setup):
    """No one, root included, can create files in /proc: refused before any work, naming the folder."""
    with pytest.raises(OutputError, match="/proc/self is not writable"):
        merge_to_file(helpers.plan_for(setup.paths), "/proc/self/merged.safetensors")
    setup.assert_clean()


# ---------------------------------------------------------------------------------------------------------------
# Failures halfway


def test_disk_full_halfway(setup):
    seen_partial = []

    def progress(p):
        seen_partial.extend(helpers.leftovers(setup.out.parent))

    with pytest.raises(OutputError) as info:
        merge_to_file(helpers.plan_for(setup.paths), setup.out, opener=helpers.FailingFile.opener(1_000_000),
                      progress=progress)
    assert "No space left on device" in str(info.value) and "merged.safetensors" in str(info.value)
    assert seen_partial, "the temporary file should have existed during the run"
    setup.assert_clean()


def test_disk_full_while_writing_the_header(setup):
    with pytest.raises(OutputError, match="No space left"):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, opener=helpers.FailingFile.opener(100))
    setup.assert_clean()


def test_disk_full_keeps_existing_output(setup):
    setup.out.write_bytes(b"previous result")
    with pytest.raises(OutputError, match="No space left"):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, overwrite=True,
                      opener=helpers.FailingFile.opener(2_000_000))
    assert setup.out.read_bytes() == b"previous result"
    setup.assert_clean(expect_files=["merged.safetensors"])


def test_io_error_halfway(setup):
    with pytest.raises(OutputError, match="Input/output error"):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, opener=helpers.FailingFile.opener(500_000, errno.EIO))
    setup.assert_clean()


def test_cancel_halfway(setup):
    calls = []
    seen_partial = []

    def cancel():
        calls.append(1)
        if len(calls) == 300:
            seen_partial.extend(helpers.leftovers(setup.out.parent))
        return len(calls) > 500

    with pytest.raises(MergeCancelled, match="cancelled"):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, cancel=cancel)
    assert len(calls) == 501  # checked once per key, stopped at the first True
    assert seen_partial
    setup.assert_clean()


def test_keyboard_interrupt_halfway(setup):
    seen_partial = []

    def progress(p):
        if p.keys_done == 400:
            seen_partial.extend(helpers.leftovers(setup.out.parent))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, progress=progress)
    assert seen_partial
    setup.assert_clean()


def test_error_in_callback_halfway(setup):
    def progress(p):
        if p.keys_done == 10:
            raise RuntimeError("callback broke")

    with pytest.raises(RuntimeError, match="callback broke"):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, progress=progress)
    setup.assert_clean()


def test_input_damaged_after_preflight(setup):
    """An input that shrinks between the header check and the read must fail cleanly, not write garbage."""
    prep = prepare(helpers.plan_for(setup.paths))
    with open(setup.paths[1], "r+b") as f:
        f.truncate(os.path.getsize(setup.paths[1]) // 2)
    setup.before[setup.paths[1]] = helpers.sha256_file(setup.paths[1])
    with pytest.raises(BadFileError, match="model-1.safetensors"):
        merge_to_file(helpers.plan_for(setup.paths), setup.out, prepared=prep)
    setup.assert_clean()
