"""Hash vectors against independent computations (hashlib, zlib, the blake3 package)."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

import blake3
import pytest

import helpers
from merger_core.identity.hashing import ALGORITHMS, FileHashes, HashCancelled, guess_hash_kind, hash_bytes, hash_file, normalize_algorithms, normalize_sha256, sample_signature
from merger_core.errors import BadFileError, ModelMergerError


def independent(data: bytes) -> dict:
    crc = zlib.crc32(data) & 0xFFFFFFFF
    a1 = None
    if len(data) > 0x100000:
        a1 = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    a3 = None
    if len(data) >= 9:
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n <= len(data) and data[8:9] == b"{":
            a3 = hashlib.sha256(data[8 + n:]).hexdigest()
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "crc32": f"{crc:08x}",
        "crc32_le": struct.pack("<I", crc).hex(),
        "blake3": blake3.blake3(data).hexdigest(),
        "autov1": a1,
        "autov3": a3,
    }


def test_hello_world_vectors_from_the_notes():
    h = hash_bytes(b"hello world")
    assert h.sha256.upper() == "B94D27B9934D3E08A52E52D7DA7DABFAC484EFE37A5380EE9088F7ACE2EFCDE9"
    assert h.autov2.upper() == "B94D27B993"
    assert h.crc32.upper() == "0D4A1185"
    assert h.crc32_le.upper() == "85114A0D"
    assert h.blake3 == blake3.blake3(b"hello world").hexdigest()
    assert h.autov1 is None  # under 1 MiB: no AutoV1
    assert h.autov3 is None  # not a safetensors file


def test_hello_world_file_matches_hash_bytes(tmp_path):
    p = tmp_path / "hw.txt"
    p.write_bytes(b"hello world")
    assert hash_file(p, "all").to_dict() == hash_bytes(b"hello world").to_dict()


@pytest.mark.parametrize(
    "size",
    [0, 1, 7, 8, 9, 65535, 0x100000, 0x100001, 0x108000, 0x110000, 0x110001, 5 * 1024 * 1024 + 3],
)
def test_generated_files_against_hashlib_zlib_blake3(tmp_path, size):
    data = os.urandom(size)
    p = tmp_path / "f.bin"
    p.write_bytes(data)
    want = independent(data)
    got = hash_file(p, "all", chunk_size=1024 * 1024)  # small chunks: windows cross chunk borders
    for k, v in want.items():
        assert getattr(got, k) == v, k
    assert got.size == size
    assert got.autov2 == want["sha256"][:10]


@pytest.mark.parametrize("threads", [False, True])
@pytest.mark.parametrize("chunk", [64 * 1024, 1024 * 1024 + 7, 16 * 1024 * 1024])
def test_every_subset_and_chunking_agree(tmp_path, threads, chunk):
    data = os.urandom(3 * 1024 * 1024 + 12345)
    p = tmp_path / "g.bin"
    p.write_bytes(data)
    want = independent(data)
    for algs in (["sha256"], ["crc32"], ["blake3"], ["autov1"], ["crc32", "blake3"], list(ALGORITHMS)):
        got = hash_file(p, algs, chunk_size=chunk, threads=threads)
        for a in algs:
            if a == "autov2":
                assert got.autov2 == want["sha256"][:10]
            else:
                assert getattr(got, a) == want[a], (algs, a)
        for a in set(["sha256", "crc32", "blake3", "autov1"]) - set(algs) - ({"sha256"} if "autov2" in algs else set()):
            assert getattr(got, a) is None, (algs, a)


def write_st(path, metadata, data: bytes, pad_header_to=None):
    header = {"w": {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}}
    if metadata is not None:
        header["__metadata__"] = metadata
    return helpers.write_raw(path, header, data)


def test_autov3_same_for_metadata_changes_and_sha256_differs(tmp_path):
    data = os.urandom(2 * 1024 * 1024 + 5)
    a = write_st(tmp_path / "a.safetensors", {"title": "first"}, data)
    b = write_st(tmp_path / "b.safetensors", {"title": "second, with a much longer title " * 50}, data)
    c = write_st(tmp_path / "c.safetensors", None, data[:-1] + bytes([data[-1] ^ 1]))
    ha, hb, hc = (hash_file(p, "all") for p in (a, b, c))
    assert ha.autov3 == hb.autov3 == helpers.data_sha256(a) == hashlib.sha256(data).hexdigest()
    assert ha.sha256 != hb.sha256
    assert hc.autov3 != ha.autov3
    assert ha.autov3_short == ha.autov3[:12]


def test_autov3_with_header_larger_than_a_chunk(tmp_path):
    data = os.urandom(300_000)
    meta = {"blob": "x" * (200 * 1024)}
    p = write_st(tmp_path / "big_header.safetensors", meta, data)
    got = hash_file(p, ["autov3"], chunk_size=64 * 1024, threads=True)
    assert got.autov3 == hashlib.sha256(data).hexdigest()


def test_autov3_of_real_checkpoint_matches_writer(tmp_path):
    p = helpers.write_model(tmp_path / "m.safetensors", seed=3)
    assert hash_file(p, ["autov3"]).autov3 == helpers.data_sha256(p)


def test_autov3_absent_for_non_safetensors(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(struct.pack("<Q", 4) + b"abcd" + b"more")  # plausible length but no JSON object
    h = hash_file(p, ["autov3"])
    assert h.autov3 is None and h.autov3_checked
    p.write_bytes(struct.pack("<Q", 10**9) + b"{}")  # length past the end
    assert hash_file(p, ["autov3"]).autov3 is None


def test_autov1_on_small_files_follows_a1111(tmp_path):
    # A1111: seek(0x100000), read(0x10000), sha256, first 8 hex; shorter files hash what is there
    for size in (0x100000 - 1, 0x100000, 0x100000 + 100, 0x110000 + 100):
        data = os.urandom(size)
        p = tmp_path / f"a{size}.bin"
        p.write_bytes(data)
        with open(p, "rb") as f:
            f.seek(0x100000)
            window = f.read(0x10000)
        got = hash_file(p, ["autov1"]).autov1
        if size <= 0x100000:
            assert got is None
        else:
            assert got == hashlib.sha256(window).hexdigest()[:8]


def test_progress_and_cancel(tmp_path):
    p = tmp_path / "p.bin"
    p.write_bytes(os.urandom(5 * 1024 * 1024))
    seen = []
    hash_file(p, ["sha256"], progress=lambda d, t: seen.append((d, t)), chunk_size=1024 * 1024)
    assert seen[-1] == (5 * 1024 * 1024, 5 * 1024 * 1024)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and len(seen) == 5
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(HashCancelled):
        hash_file(p, "all", cancel=cancel, chunk_size=1024 * 1024)


def test_errors_name_the_file(tmp_path):
    with pytest.raises(BadFileError, match="missing.bin"):
        hash_file(tmp_path / "missing.bin")
    with pytest.raises(BadFileError, match="folder"):
        hash_file(tmp_path)
    with pytest.raises(ModelMergerError, match="md5"):
        normalize_algorithms("sha256,md5")


def test_algorithm_names():
    assert normalize_algorithms("autov2") == ("sha256", "autov2")
    assert normalize_algorithms("all") == ALGORITHMS
    assert normalize_algorithms(["BLAKE3", "crc32"]) == ("crc32", "blake3")


def test_normalize_sha256_refuses_wrong_embedded_forms():
    good = "A5F58EB1C33616C4F06BCA55AF39876A7B817913CD829CAA8ACB111B770C85CC"
    assert normalize_sha256(good) == good.lower()
    assert normalize_sha256("0x" + good) == good.lower()
    assert normalize_sha256(hashlib.sha256(b"").hexdigest()) is None  # empty-input hash, kohya's mistake
    assert normalize_sha256(good[:-1]) is None
    assert normalize_sha256("<script>" + good[8:]) is None
    assert normalize_sha256(None) is None
    assert guess_hash_kind("A5F58EB1C3") == ("autov2",)
    assert guess_hash_kind("22D8CB95B807") == ("autov3",)
    assert "crc32" in guess_hash_kind("DAEE95B7")


def test_sample_signature_changes_with_sampled_bytes(tmp_path):
    p = tmp_path / "s.bin"
    data = bytearray(os.urandom(2 * 1024 * 1024))
    p.write_bytes(data)
    s1 = sample_signature(p)
    data[-1] ^= 0xFF
    p.write_bytes(data)
    assert sample_signature(p) != s1
    q = tmp_path / "t.bin"
    q.write_bytes(b"short")
    assert sample_signature(q) != sample_signature(p)


def test_file_hashes_has():
    h = FileHashes(size=10, sha256="0" * 64)
    assert h.has(["sha256", "autov2", "autov1"])  # autov1 cannot exist for 10 bytes
    assert not h.has(["autov3"])
    h.autov3_checked = True
    assert h.has(["autov3"])
    assert not h.has(["blake3"])


def test_cli_hash_prints_and_caches(tmp_path, monkeypatch, capsys):
    import json as _json

    from merger_core.cli import main

    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))
    p = tmp_path / "hw.txt"
    p.write_bytes(b"hello world")
    m = helpers.write_model(tmp_path / "m.safetensors", seed=2)
    assert main(["hash", "-a", "all", str(p), m]) == 0
    out = capsys.readouterr().out
    assert "B94D27B9934D3E08A52E52D7DA7DABFAC484EFE37A5380EE9088F7ACE2EFCDE9" in out
    assert "0D4A1185 (little-endian 85114A0D)" in out
    assert helpers.data_sha256(m).upper() in out
    assert os.path.exists(tmp_path / "home" / "cache.sqlite3")
    assert main(["hash", "--json", "-a", "autov2,autov3", str(p), m]) == 0
    rows = _json.loads(capsys.readouterr().out)
    assert rows[0]["autov2"] == "B94D27B993" and rows[0]["autov3"] is None
    assert rows[1]["autov3_full"] == helpers.data_sha256(m).upper()
    assert main(["hash", "-a", "md5", str(p)]) == 2
    assert "md5" in capsys.readouterr().err
    assert main(["hash", str(tmp_path / "none.bin")]) == 2


def test_cli_hash_with_home_that_is_a_file_still_hashes(tmp_path):
    # MODEL_MERGER_HOME names a regular file: the cache cannot live there, so a temporary in-memory one is used
    import subprocess
    import sys

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    p = tmp_path / "hw.txt"
    p.write_bytes(b"hello world")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for home in (blocker, blocker / "below"):
        env = dict(os.environ, PYTHONPATH=repo, MODEL_MERGER_HOME=str(home))
        proc = subprocess.run([sys.executable, "-m", "merger_core", "hash", str(p)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert "B94D27B9934D3E08A52E52D7DA7DABFAC484EFE37A5380EE9088F7ACE2EFCDE9" in proc.stdout
        assert "Traceback" not in proc.stdout + proc.stderr
        warning = proc.stderr.strip()
        assert warning.count("\n") == 0 and "in-memory" in warning and "is a file, not a folder" in warning, warning
        assert blocker.read_text() == "x"
