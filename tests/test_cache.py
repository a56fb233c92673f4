"""The SQLite cache: hits, invalidation, moved files, facts, CivitAI answers, two processes, corrupt files."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys

import pytest

from merger_core.identity import cache as cache_mod
from merger_core.host import userdirs
from merger_core.identity.cache import HashCache, open_cache


@pytest.fixture
def db(tmp_path):
    c = HashCache(tmp_path / "state" / "cache.sqlite3")
    yield c
    c.close()


@pytest.fixture
def count_hashing(monkeypatch):
    """Counts full hash passes (the cache's only way to read a whole file)."""
    calls = []
    real = cache_mod.hash_file

    def spy(path, algorithms=None, **kw):
        calls.append((os.fspath(path), tuple(algorithms)))
        return real(path, algorithms, **kw)

    monkeypatch.setattr(cache_mod, "hash_file", spy)
    return calls


def write(p, data):
    with open(p, "wb") as f:
        f.write(data)
    return os.fspath(p)


def test_hit_after_first_hash(db, tmp_path, count_hashing):
    data = os.urandom(1_500_000)
    p = write(tmp_path / "a.bin", data)
    h1 = db.hashes(p, ["sha256", "blake3"])
    assert h1.sha256 == hashlib.sha256(data).hexdigest()
    assert len(count_hashing) == 1
    h2 = db.hashes(p, ["sha256"])
    h3 = db.hashes(p, ["blake3", "autov2"])
    assert len(count_hashing) == 1
    assert h2.sha256 == h3.sha256 == h1.sha256 and h3.blake3 == h1.blake3
    assert db.lookup(p, ["sha256"]).sha256 == h1.sha256
    # a hash not computed yet: only the missing one is computed, in one pass
    h4 = db.hashes(p, ["crc32", "sha256"])
    assert count_hashing[-1][1] == ("crc32",)
    assert h4.sha256 == h1.sha256 and h4.crc32 is not None


def test_symlink_and_realpath_share_an_entry(db, tmp_path, count_hashing):
    p = write(tmp_path / "a.bin", os.urandom(1000))
    link = tmp_path / "link.bin"
    os.symlink(p, link)
    db.hashes(p)
    db.hashes(link)
    assert len(count_hashing) == 1


def test_size_change_invalidates(db, tmp_path, count_hashing):
    p = write(tmp_path / "a.bin", b"x" * 5000)
    db.hashes(p)
    st = os.stat(p)
    write(p, b"x" * 5001)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, other size
    assert db.lookup(p) is None
    h = db.hashes(p)
    assert len(count_hashing) == 2
    assert h.sha256 == hashlib.sha256(b"x" * 5001).hexdigest()


def test_mtime_change_invalidates(db, tmp_path, count_hashing):
    p = write(tmp_path / "a.bin", b"a" * 5000)
    db.hashes(p)
    st = os.stat(p)
    write(p, b"b" * 5000)  # same size, other content
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    h = db.hashes(p)
    assert len(count_hashing) == 2
    assert h.sha256 == hashlib.sha256(b"b" * 5000).hexdigest()


def test_same_size_same_mtime_other_content_is_not_served_across_paths(db, tmp_path, count_hashing):
    # a different file that happens to have the old one's size: samples differ, so it is hashed
    p = write(tmp_path / "a.bin", os.urandom(3_000_000))
    db.hashes(p)
    q = write(tmp_path / "b.bin", os.urandom(3_000_000))
    st = os.stat(p)
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns))
    db.hashes(q)
    assert len(count_hashing) == 2


def test_rename_detected_without_rehash(db, tmp_path, count_hashing):
    data = os.urandom(3_000_000)
    p = write(tmp_path / "a.bin", data)
    h = db.hashes(p, "all")
    db.put_fact(p, "structure", {"arch": "sdxl"})
    moved = tmp_path / "sub"
    moved.mkdir()
    q = moved / "renamed.bin"
    os.rename(p, q)
    assert db.lookup(q) is None  # lookup alone never reads the file
    h2 = db.hashes(q, "all")
    assert len(count_hashing) == 1
    assert h2.to_dict() == h.to_dict()
    assert db.get_fact(q, "structure") == {"arch": "sdxl"}  # facts move with the file
    assert db.stats()["files"] == 1  # the old path's row is gone


def same_samples_other_bytes(data: bytes) -> bytes:
    """``data`` with bytes changed outside the blocks that sample_signature reads (start, quarters, end)."""
    from merger_core.identity import hashing

    size = len(data)
    last = size - hashing.SAMPLE_SIZE
    starts = [last * k // (hashing.SAMPLE_POINTS - 1) for k in range(hashing.SAMPLE_POINTS)]
    spot = starts[0] + hashing.SAMPLE_SIZE + 1000
    assert all(not (a <= spot < a + hashing.SAMPLE_SIZE) for a in starts)
    out = bytearray(data)
    out[spot:spot + 100] = bytes(b ^ 0xFF for b in out[spot:spot + 100])
    return bytes(out)


@pytest.mark.parametrize("case", ["deleted, same mtime", "deleted, other mtime", "still there, same mtime"])
def test_other_bytes_with_the_same_samples_get_their_own_hash(db, tmp_path, count_hashing, case):
    from merger_core.identity.hashing import sample_signature

    a_bytes = os.urandom(3_000_000)
    b_bytes = same_samples_other_bytes(a_bytes)
    a = write(tmp_path / "a.bin", a_bytes)
    db.hashes(a, ["sha256", "blake3"])
    db.put_fact(a, "structure", {"arch": "sdxl"})
    st = os.stat(a)
    b = write(tmp_path / "b.bin", b_bytes)  # written while a exists: never a's inode
    if case != "deleted, other mtime":
        os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    if case.startswith("deleted"):
        os.unlink(a)
    with open(tmp_path / "probe.bin", "wb") as f:
        f.write(a_bytes)
    assert sample_signature(tmp_path / "probe.bin") == sample_signature(b)  # the samples cannot tell them apart
    h = db.hashes(b, ["sha256", "blake3"])
    assert h.sha256 == hashlib.sha256(b_bytes).hexdigest() != hashlib.sha256(a_bytes).hexdigest()
    assert len(count_hashing) == 2
    assert db.lookup(b, ["sha256"]).sha256 == hashlib.sha256(b_bytes).hexdigest()
    assert db.get_fact(b, "structure") is None  # a's facts are not b's


def test_hard_link_recognised_without_rehash(db, tmp_path, count_hashing):
    p = write(tmp_path / "a.bin", os.urandom(2_000_000))
    h = db.hashes(p, "all")
    q = tmp_path / "link.bin"
    os.link(p, q)  # same inode, both names stay
    assert db.hashes(q, "all").to_dict() == h.to_dict()
    assert len(count_hashing) == 1
    assert db.stats()["files"] == 2


def test_copy_then_delete_is_rehashed_and_then_takes_over(db, tmp_path, count_hashing):
    # another inode (a move across file systems, or a copy and delete): only a full hash can show it is the same
    data = os.urandom(2_000_000)
    p = write(tmp_path / "a.bin", data)
    h = db.hashes(p, ["sha256", "blake3"])
    db.put_fact(p, "structure", {"arch": "sd1"})
    st = os.stat(p)
    q = write(tmp_path / "moved.bin", data)
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.unlink(p)
    h2 = db.hashes(q, ["sha256"])
    assert len(count_hashing) == 2 and count_hashing[-1][1] == ("sha256",)
    assert h2.sha256 == h.sha256
    # proven the same bytes: the other hashes and the facts come along, the old row goes
    assert db.hashes(q, ["blake3"]).blake3 == h.blake3 and len(count_hashing) == 2
    assert db.get_fact(q, "structure") == {"arch": "sd1"}
    assert db.stats()["files"] == 1


V1_SCHEMA = """
CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sample TEXT,
    sha256 TEXT, autov1 TEXT, autov3 TEXT, autov3_checked INTEGER NOT NULL DEFAULT 0, crc32 TEXT, blake3 TEXT,
    updated REAL NOT NULL);
CREATE INDEX files_by_size ON files(size, sample);
CREATE TABLE facts (path TEXT NOT NULL, kind TEXT NOT NULL, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    value TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (path, kind));
CREATE TABLE civitai (sha256 TEXT PRIMARY KEY, found INTEGER NOT NULL, data TEXT, fetched REAL NOT NULL);
PRAGMA user_version=1;
"""


def test_cache_from_before_inodes_keeps_its_answers_and_adopts_nothing(tmp_path, count_hashing):
    from merger_core.identity.hashing import sample_signature

    data = os.urandom(1_000_000)
    gone = str(tmp_path / "gone.bin")
    p = write(tmp_path / "new.bin", data)
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    st = os.stat(p)
    conn.execute("INSERT INTO files (path, size, mtime_ns, sample, sha256, updated) VALUES (?,?,?,?,?,0)",
                 (gone, len(data), st.st_mtime_ns, sample_signature(p), "0" * 64))
    conn.execute("INSERT INTO civitai VALUES (?, 1, ?, 0)", ("a" * 64, '{"id": 5}'))
    conn.commit()
    conn.close()
    c = HashCache(path)
    assert c.get_civitai("a" * 64).data == {"id": 5}
    assert c.hashes(p).sha256 == hashlib.sha256(data).hexdigest()  # not the old row's, which has no inode
    assert len(count_hashing) == 1
    c.close()


def test_copy_with_new_mtime_is_rehashed(db, tmp_path, count_hashing):
    data = os.urandom(2_000_000)
    p = write(tmp_path / "a.bin", data)
    db.hashes(p)
    q = write(tmp_path / "copy.bin", data)  # old path still there, mtime differs
    st = os.stat(p)
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    db.hashes(q)
    assert len(count_hashing) == 2


def test_changed_while_hashing_is_not_stored(db, tmp_path, monkeypatch):
    p = write(tmp_path / "a.bin", os.urandom(100_000))
    real = cache_mod.hash_file

    def touching(path, algorithms=None, **kw):
        out = real(path, algorithms, **kw)
        with open(path, "ab") as f:
            f.write(b"more")
        return out

    monkeypatch.setattr(cache_mod, "hash_file", touching)
    db.hashes(p)
    assert db.stats()["files"] == 0


def test_facts_follow_file_identity(db, tmp_path):
    p = write(tmp_path / "a.bin", b"123")
    assert db.get_fact(p, "header") is None
    db.put_fact(p, "header", {"keys": 3, "dtypes": ["F16"]})
    db.put_fact(p, "other", [1, 2])
    assert db.get_fact(p, "header") == {"keys": 3, "dtypes": ["F16"]}
    assert db.get_fact(p, "other") == [1, 2]
    write(p, b"1234")
    assert db.get_fact(p, "header") is None


def test_civitai_answers_and_negative_ttl(db):
    sha = "A" * 64
    assert db.get_civitai(sha) is None
    db.put_civitai(sha, {"id": 1, "name": "v"})
    e = db.get_civitai(sha.lower())
    assert e.found and e.data == {"id": 1, "name": "v"}
    miss = "b" * 64
    db.put_civitai(miss, None)
    e = db.get_civitai(miss)
    assert e is not None and not e.found
    assert db.get_civitai(miss, negative_ttl=0) is None  # expired
    db2 = HashCache(db.db_path, negative_ttl=-1)
    assert db2.get_civitai(miss) is None
    assert db2.get_civitai(sha).found  # found answers do not expire
    db2.close()


def test_corrupt_database_is_moved_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "cache.sqlite3"
    c = HashCache(path)
    f = write(tmp_path / "a.bin", b"data")
    c.hashes(f)
    c.close()
    with open(path, "wb") as fh:
        fh.write(b"this is not sqlite at all" * 200)
    c = HashCache(path)
    assert c.recovered_from and os.path.exists(c.recovered_from)
    assert not c.in_memory
    assert c.stats()["files"] == 0
    assert c.hashes(f).sha256 == hashlib.sha256(b"data").hexdigest()
    assert c.stats()["files"] == 1
    assert any("moved" in r.getMessage() for r in caplog.records)
    c.close()


def test_database_corrupted_while_open_recovers(tmp_path):
    path = tmp_path / "cache.sqlite3"
    c = HashCache(path)
    f = write(tmp_path / "a.bin", os.urandom(10_000))
    c.hashes(f)
    # clobber the file under the open connection (pages and WAL)
    c._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = os.path.getsize(path)
    with open(path, "r+b") as fh:
        fh.write(os.urandom(size))
    h = c.hashes(f)  # never raises; served or recomputed
    assert h.sha256 == hashlib.sha256(open(f, "rb").read()).hexdigest()
    c.put_fact(f, "k", 1)
    assert c.get_fact(f, "k") in (1, None)
    c.close()
    c2 = HashCache(path)
    c2.put_fact(f, "k", 2)
    assert c2.get_fact(f, "k") == 2
    c2.close()


def test_unwritable_location_falls_back_to_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    c = HashCache(blocker / "sub" / "cache.sqlite3")  # parent is a file: cannot be created
    assert c.in_memory
    f = write(tmp_path / "a.bin", b"z")
    assert c.hashes(f).sha256 == hashlib.sha256(b"z").hexdigest()
    c.close()


@pytest.mark.parametrize("below", [False, True])
def test_home_that_is_a_file_gives_a_memory_cache_and_a_clear_error(tmp_path, monkeypatch, caplog, below):
    from merger_core.errors import ModelMergerError

    blocker = tmp_path / "home-file"
    blocker.write_text("x")
    home = blocker / "sub" if below else blocker
    monkeypatch.setenv(userdirs.ENV_VAR, str(home))
    with pytest.raises(ModelMergerError, match="is a file, not a folder"):
        userdirs.data_dir()
    assert userdirs.cache_db_path(create_dir=False) == os.path.join(str(home), userdirs.CACHE_DB_NAME)
    c = open_cache()
    assert c.in_memory
    f = write(tmp_path / "a.bin", b"z")
    assert c.hashes(f).sha256 == hashlib.sha256(b"z").hexdigest()
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 1 and "in-memory" in messages[0] and str(blocker) in messages[0]
    assert "is a file, not a folder" in messages[0] and "\n" not in messages[0]


WRITER = r"""
import os, sys
from merger_core.identity.cache import HashCache
db, folder, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = HashCache(db)
for i in range(n):
    p = os.path.join(folder, f"{tag}-{i}.bin")
    with open(p, "wb") as f:
        f.write(f"{tag}{i}".encode() * 100)
    c.hashes(p)
    c.put_fact(p, "n", i)
    c.put_civitai(f"{ord(tag[0]):02x}{i:062x}", {"i": i})
c.close()
print("ok")
"""


def test_two_processes_writing_at_once(tmp_path):
    db_path = tmp_path / "shared.sqlite3"
    folder = tmp_path / "files"
    folder.mkdir()
    HashCache(db_path).close()  # create it first (WAL mode is set on creation)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo)
    n = 150
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(db_path), str(folder), tag, str(n)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for tag in ("a", "b")
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == "ok"
        assert "busy" not in err and "error" not in err.lower(), err
    c = HashCache(db_path)
    assert c.stats() == {"files": 2 * n, "facts": 2 * n, "civitai": 2 * n}
    for tag in ("a", "b"):
        p = folder / f"{tag}-7.bin"
        assert c.lookup(p).sha256 == hashlib.sha256(f"{tag}7".encode() * 100).hexdigest()
        assert c.get_fact(p, "n") == 7
    assert sqlite3.connect(db_path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()


def test_data_dir_env_override_and_comfyui_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(userdirs.ENV_VAR, str(tmp_path / "home"))
    assert userdirs.data_dir() == str(tmp_path / "home")
    assert os.path.isdir(tmp_path / "home")
    assert userdirs.cache_db_path() == str(tmp_path / "home" / userdirs.CACHE_DB_NAME)
    try:
        userdirs.use_comfyui_user_dir(tmp_path / "comfy_user")
        assert userdirs.data_dir(create=False) == str(tmp_path / "home")  # the variable wins
        monkeypatch.delenv(userdirs.ENV_VAR)
        assert userdirs.data_dir(create=False) == str(tmp_path / "comfy_user" / "model_merger")
    finally:
        userdirs.use_comfyui_user_dir(None)
    import platformdirs

    assert userdirs.data_dir(create=False) == os.path.abspath(platformdirs.user_data_dir("model-merger", appauthor=False))


def test_open_cache_is_shared_per_path(tmp_path, monkeypatch):
    monkeypatch.setenv(userdirs.ENV_VAR, str(tmp_path / "home"))
    a = open_cache()
    b = open_cache(userdirs.cache_db_path())
    assert a is b
    assert a.db_path.startswith(str(tmp_path / "home"))


def test_writer_hash_recorded_for_outputs(db, tmp_path, count_hashing):
    import helpers
    from merger_core.identity.cache import remember_written_file

    p = helpers.write_model(tmp_path / "out.safetensors", seed=4)
    remember_written_file(p, "0x" + helpers.data_sha256(p), cache=db)
    h = db.hashes(p, ["autov3"])
    assert h.autov3 == helpers.data_sha256(p)
    assert count_hashing == []  # not read
    remember_written_file(p, "not a hash", cache=db)  # ignored, no error
    h2 = db.hashes(p, ["sha256", "autov3"])
    assert count_hashing[-1][1] == ("sha256",)
    assert h2.sha256 == helpers.sha256_file(p) and h2.autov3 == h.autov3
