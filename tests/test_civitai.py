"""The CivitAI client, lookups through the cache, scan enrichment and downloads, against a local stub server.

Nothing here reaches the internet: every request goes to ``civitai_stub.CivitaiStub`` on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import logging
import os

import pytest

import helpers
from civitai_stub import CivitaiStub, make_version
from merger_core.identity import civitai
from merger_core.identity.cache import HashCache
from merger_core.identity.civitai import CivitaiClient, DownloadError, RetryPolicy, base_model_family, download, enrich_manifest, lookup_hashes, lookup_report, redact, run_sync

FAST = RetryPolicy(max_retries=3, backoff_start=0.01, backoff_max=0.05)
KEY = "sk-test-SECRET-0123456789abcdef"
EXAMPLE_SHA = "A5F58EB1C33616C4F06BCA55AF39876A7B817913CD829CAA8ACB111B770C85CC"


@pytest.fixture
def stub():
    with CivitaiStub() as s:
        yield s


@pytest.fixture
def db(tmp_path):
    c = HashCache(tmp_path / "cache.sqlite3")
    yield c
    c.close()


@pytest.fixture(autouse=True)
def no_env_key(monkeypatch):
    monkeypatch.delenv(civitai.ENV_API_KEY, raising=False)
    monkeypatch.delenv(civitai.ENV_BASE_URL, raising=False)


def example_version():
    return make_version(
        2514310, 827184, EXAMPLE_SHA, base_model="Illustrious", model_name="Example XL", name="v2.0",
        trained_words=["masterpiece", "1girl"], file_name="example.safetensors",
        extra_hashes={"AutoV2": "A5F58EB1C3", "AutoV1": "4748A7F6", "CRC32": "DAEE95B7", "AutoV3": "22D8CB95B807"},
        other_files=[{"id": 9, "name": "vae.safetensors", "type": "VAE", "hashes": {"SHA256": "F" * 64}}],
    )


def ask(stub, hashes, **kw):
    kw.setdefault("retry", FAST)
    kw.setdefault("timeout", 5)
    return lookup_hashes(hashes, base_url=stub.base_url, **kw)


def test_found_by_hash_with_all_fields(stub, db):
    stub.add_version(example_version())
    r = ask(stub, [EXAMPLE_SHA.lower()], cache=db)[EXAMPLE_SHA.lower()]
    assert r.status == "found" and r.confirmed and r.source == "civitai"
    assert (r.model_id, r.version_id) == (827184, 2514310)
    assert (r.model_name, r.version_name, r.base_model, r.model_type) == ("Example XL", "v2.0", "Illustrious", "Checkpoint")
    assert r.trained_words == ["masterpiece", "1girl"]
    assert (r.file_name, r.file_format, r.file_precision) == ("example.safetensors", "SafeTensor", "fp16")
    assert r.page_url == f"http://127.0.0.1:{stub.port}/models/827184?modelVersionId=2514310"
    assert r.image_urls == ["https://image.example/2514310/0.jpeg", "https://image.example/2514310/1.jpeg"]
    assert stub.count("GET", "/api/v1/model-versions/by-hash/") == 1
    assert stub.requests[-1][1].endswith(EXAMPLE_SHA)  # full SHA256, upper case
    # second time: from the cache, no request
    again = ask(stub, [EXAMPLE_SHA], cache=db)[EXAMPLE_SHA.lower()]
    assert again.source == "cache" and again.version_id == 2514310
    assert len(stub.requests) == 1


def test_not_found_is_remembered_for_the_ttl(stub, db):
    sha = "1" * 64
    r = ask(stub, [sha], cache=db)[sha]
    assert r.status == "not_found" and r.source == "civitai"
    assert ask(stub, [sha], cache=db)[sha].source == "cache"
    assert len(stub.requests) == 1
    r3 = ask(stub, [sha], cache=db, negative_ttl=0)[sha]  # expired: asked again
    assert r3.source == "civitai" and len(stub.requests) == 2


def test_answer_for_another_file_is_not_accepted(stub, db):
    # the hash matches only a non-SHA256 field (a short-hash collision): files[] lack our SHA256
    sha = "2" * 64
    v = make_version(5, 6, "3" * 64, extra_hashes={"BLAKE3": sha})
    stub.add_version(v)
    r = ask(stub, [sha], cache=db)[sha]
    assert r.status == "not_found" and "none of its files" in r.message
    assert db.get_civitai(sha) is None  # not remembered


def test_archived_version_without_files_is_unconfirmed(stub, db):
    sha = "4" * 64
    v = make_version(7, 8, sha, files=[], base_model="SD 1.5")
    v["_match"] = [sha]
    stub.add_version(v)
    r = ask(stub, [sha], cache=db)[sha]
    assert r.found and not r.confirmed and r.version_id == 7
    assert "unconfirmed" in r.message
    assert r.manifest_dict()["confirmed"] is False


def test_429_then_success(stub, db):
    stub.add_version(example_version())
    stub.script[f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"] = [429, 429]
    r = ask(stub, [EXAMPLE_SHA], cache=db)[EXAMPLE_SHA.lower()]
    assert r.found
    assert stub.count("GET", "/api/v1/model-versions/by-hash/") == 3


def test_500_retried_then_gives_up_with_clear_error(stub, db):
    stub.script[f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"] = [500, 502, 503, 500, 500]
    r = ask(stub, [EXAMPLE_SHA], cache=db)[EXAMPLE_SHA.lower()]
    assert r.status == "error"
    assert "500" in r.message and "gave up after 4 tries" in r.message
    assert stub.count("GET", "/api/v1/model-versions/by-hash/") == 4  # 1 + max_retries
    assert db.get_civitai(EXAMPLE_SHA) is None  # errors are not cached


def test_other_4xx_not_retried(stub):
    stub.script[f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"] = [403]
    r = ask(stub, [EXAMPLE_SHA])[EXAMPLE_SHA.lower()]
    assert r.status == "error" and "403" in r.message and "API key" in r.message
    assert len(stub.requests) == 1


def test_malformed_json(stub):
    stub.script[f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"] = ["malformed"]
    r = ask(stub, [EXAMPLE_SHA])[EXAMPLE_SHA.lower()]
    assert r.status == "error" and "not JSON" in r.message
    assert len(stub.requests) == 1


def test_slow_answer_times_out(stub):
    stub.add_version(example_version())
    path = f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"
    stub.script[path] = [("sleep", 3), ("sleep", 3)]
    r = ask(stub, [EXAMPLE_SHA], timeout=0.3, retry=RetryPolicy(max_retries=1, backoff_start=0.01))
    assert r[EXAMPLE_SHA.lower()].status == "error"
    assert "did not answer" in r[EXAMPLE_SHA.lower()].message and "0.3 s" in r[EXAMPLE_SHA.lower()].message
    # a slow first answer followed by a quick one succeeds
    stub.script[path] = [("sleep", 3)]
    assert ask(stub, [EXAMPLE_SHA], timeout=0.3)[EXAMPLE_SHA.lower()].found


def test_connection_refused_is_an_error_result():
    with CivitaiStub() as s:
        url = s.base_url
    r = lookup_hashes([EXAMPLE_SHA], base_url=url, retry=RetryPolicy(max_retries=1, backoff_start=0.01))
    assert r[EXAMPLE_SHA.lower()].status == "error" and "cannot reach" in r[EXAMPLE_SHA.lower()].message


def test_batch_with_misses_in_groups_of_100(stub, db):
    present = [hashlib.sha256(f"m{i}".encode()).hexdigest() for i in range(30)]
    missing = [hashlib.sha256(f"x{i}".encode()).hexdigest() for i in range(120)]
    for i, sha in enumerate(present):
        stub.add_version(make_version(1000 + i, 2000 + i, sha, base_model="SD 1.5"))
    stub.add_version(example_version())
    allh = [x for pair in zip(present, missing) for x in pair] + missing[len(present):]
    res = ask(stub, allh, cache=db)
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 2  # 150 hashes: 100 + 50
    assert stub.count("GET", "/") == 0
    assert all(res[s].found and res[s].version_id == 1000 + i for i, s in enumerate(present))
    assert all(res[s].status == "not_found" for s in missing)
    # cached both ways
    res2 = ask(stub, allh, cache=db)
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 2
    assert all(r.source == "cache" for r in res2.values())


def test_batch_429_then_success(stub):
    shas = [hashlib.sha256(f"b{i}".encode()).hexdigest() for i in range(3)]
    stub.add_version(make_version(1, 2, shas[0]))
    stub.script["POST /api/v1/model-versions/by-hash"] = [429]
    res = ask(stub, shas)
    assert res[shas[0]].found and res[shas[1]].status == "not_found"
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 2


def test_offline_serves_the_cache_only(stub, db):
    stub.add_version(example_version())
    ask(stub, [EXAMPLE_SHA], cache=db)
    n = len(stub.requests)
    other = "5" * 64
    res = ask(stub, [EXAMPLE_SHA, other], cache=db, offline=True)
    assert len(stub.requests) == n
    assert res[EXAMPLE_SHA.lower()].found and res[EXAMPLE_SHA.lower()].source == "cache"
    assert res[other].status == "offline"


def test_auth_header_only_with_a_key_and_never_logged(stub, db, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    stub.add_version(example_version())
    ask(stub, [EXAMPLE_SHA])
    assert "Authorization" not in stub.requests[-1][2]
    ask(stub, [EXAMPLE_SHA], api_key=KEY)
    assert stub.requests[-1][2]["Authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv(civitai.ENV_API_KEY, KEY)
    stub.script[f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"] = [500, 500, 500, 500, 401]
    r = ask(stub, [EXAMPLE_SHA])[EXAMPLE_SHA.lower()]
    assert stub.requests[-1][2]["Authorization"] == f"Bearer {KEY}"  # from the environment
    assert r.status == "error"
    r2 = ask(stub, [EXAMPLE_SHA], cache=db)[EXAMPLE_SHA.lower()]
    for text in [r.message, repr(r), repr(r2), str(r2.manifest_dict()), repr(CivitaiClient(api_key=KEY))]:
        assert KEY not in text
    assert caplog.records, "debug logging should have recorded the requests"
    for rec in caplog.records:
        assert KEY not in rec.getMessage()
    with HashCache(db.db_path) as again:
        dump = "\n".join(again._conn.iterdump())
    assert KEY not in dump


def test_redact():
    assert redact(f"GET /x?token={KEY}&a=1", None) == "GET /x?token=***&a=1"
    assert KEY not in redact(f"header Bearer {KEY}", None)
    assert redact(f"xx{KEY}yy", KEY) == "xx***yy"


def test_client_bad_json_type(stub):
    stub.script["POST /api/v1/model-versions/by-hash"] = []

    async def go():
        async with CivitaiClient(stub.base_url, retry=FAST) as c:
            assert await c.versions_by_hashes([EXAMPLE_SHA]) == []
            assert await c.version(424242) is None
            stub.add_version(example_version())
            assert (await c.version(2514310))["modelId"] == 827184
            assert (await c.model(827184))["id"] == 827184

    run_sync(go)


# ---------------------------------------------------------------------------------------------------------------
# Files, reports, manifests


def sdxl_sparse(path):
    unet = "model.diffusion_model."
    layout = {
        unet + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": ("F16", (640, 2048)),
        unet + "label_emb.0.0.weight": ("F16", (1280, 2816)),
    }
    return helpers.write_sparse_checkpoint(path, layout)


def test_lookup_report_for_files(stub, db, tmp_path):
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2)
    c = helpers.write_model(tmp_path / "c.safetensors", seed=3)
    sa, sb = helpers.sha256_file(a), helpers.sha256_file(b)
    stub.add_version(make_version(11, 21, sa, base_model="SD 1.5", trained_words=["foo", "bar"], model_name="Alpha"))
    stub.add_version(make_version(12, 22, sb, base_model="Pony", trained_words=["bar", "baz"], model_name="Beta"))
    report, words, base = lookup_report([a, b, c], cache=db, base_url=stub.base_url, retry=FAST)
    assert words == "foo, bar, baz"
    assert base == "SD 1.5, Pony"
    assert "Alpha" in report and "Beta" in report and "Not on CivitAI" in report
    assert sa.upper() in report and "c.safetensors" in report
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 1
    # offline: from the cache, with a clear note, and no requests
    n = len(stub.requests)
    report2, words2, base2 = lookup_report(a, offline=True, cache=db, base_url=stub.base_url)
    assert report2.startswith("CivitAI lookup (offline") and "From the cache" in report2
    assert (words2, base2) == ("foo, bar", "SD 1.5")
    assert len(stub.requests) == n
    d = tmp_path / "d.safetensors"
    helpers.write_model(d, seed=9)
    report3, words3, base3 = lookup_report([d], offline=True, cache=db, base_url=stub.base_url)
    assert "Offline: not in the local cache" in report3 and (words3, base3) == ("", "")


def test_base_model_families():
    assert base_model_family("Pony") == base_model_family("Illustrious") == base_model_family("NoobAI") == "sdxl"
    assert base_model_family("SDXL 1.0", "Refiner") == "sdxl-refiner"
    assert base_model_family("SD 1.5") == "sd1" and base_model_family("Flux.1 D") == "flux"
    assert base_model_family("Hunyuan 1") is None and base_model_family(None) is None


class Entry:
    def __init__(self, path, weight=1.0):
        self.path, self.weight, self.sha256, self.notes, self.civitai = path, weight, None, None, None


class Manifest:
    def __init__(self, models):
        self.models = models


def test_enrich_manifest_records_and_warns(stub, db, tmp_path):
    sd15 = helpers.write_model(tmp_path / "sd15.safetensors", seed=1)
    wrong = helpers.write_model(tmp_path / "labelled_sdxl.safetensors", seed=2)
    pony = sdxl_sparse(tmp_path / "pony.safetensors")
    unknown = helpers.write_model(tmp_path / "unknown.safetensors", seed=3)
    s = {p: helpers.sha256_file(p) for p in (sd15, wrong, pony, unknown)}
    stub.add_version(make_version(1, 10, s[sd15], base_model="SD 1.5"))
    stub.add_version(make_version(2, 20, s[wrong], base_model="SDXL 1.0"))
    stub.add_version(make_version(3, 30, s[pony], base_model="Pony", trained_words=["score_9"]))
    m = Manifest([Entry("sd15.safetensors"), Entry(wrong), Entry(pony), Entry(unknown)])
    warnings = enrich_manifest(m, cache=db, base_dir=str(tmp_path), base_url=stub.base_url, retry=FAST)
    assert [e.sha256 for e in m.models] == [s[sd15], s[wrong], s[pony], s[unknown]]
    assert m.models[0].civitai["base_model"] == "SD 1.5" and m.models[0].civitai["version_id"] == 1
    assert m.models[2].civitai["trained_words"] == ["score_9"]
    assert m.models[3].civitai == {"status": "not_found", "message": "not on CivitAI"}
    # pony.safetensors holds two SDXL-shaped keys only: the one detector recognises no architecture in it (the old
    # key probe called it SDXL), so CivitAI's "Pony" cannot be confirmed and that is said too
    assert len(warnings) == 2, warnings
    assert "labelled_sdxl.safetensors" in warnings[0] and "SDXL 1.0" in warnings[0]
    assert "(sd1)" in warnings[0]
    assert "pony.safetensors" in warnings[1] and "not recognised" in warnings[1]
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 1
    assert db.get_fact(pony, "civitai.structure") == "unknown"  # the detector's answer, cached
    # dict entries work too; a second run is served from the cache
    entries = [{"path": sd15}, {"path": pony}]
    again = enrich_manifest(entries, cache=db, base_url=stub.base_url, offline=True)
    assert len(again) == 1 and "pony.safetensors" in again[0]
    assert entries[1]["civitai"]["base_model"] == "Pony"
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 1


def test_enrich_manifest_failure_is_a_warning(stub, db, tmp_path):
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=2)
    stub.script["POST /api/v1/model-versions/by-hash"] = [500] * 10
    m = Manifest([Entry(a), Entry(b)])
    warnings = enrich_manifest(m, cache=db, base_url=stub.base_url, retry=FAST, api_key=KEY)
    assert any("lookup failed" in w for w in warnings) and any("2 files" in w for w in warnings)
    assert all(e.sha256 and e.civitai["status"] == "error" for e in m.models)
    assert all(KEY not in w for w in warnings)


# ---------------------------------------------------------------------------------------------------------------
# Downloads


def serve_file(stub, version_id=77, size=3 * 1024 * 1024 + 11, name="base.safetensors"):
    data = os.urandom(size)
    sha = hashlib.sha256(data).hexdigest()
    stub.add_version(make_version(version_id, 1, sha, file_name=name))
    stub.add_file(version_id, name, data)
    return data, sha


def test_download_by_version_id_verified(stub, tmp_path):
    data, sha = serve_file(stub)
    seen = []
    path = download(77, tmp_path, base_url=stub.base_url, api_key=KEY, retry=FAST, cache=False,
                    progress=lambda d, t: seen.append((d, t)))
    assert path == str(tmp_path / "base.safetensors")
    assert open(path, "rb").read() == data
    assert seen[-1] == (len(data), len(data))
    assert helpers.leftovers(tmp_path) == []
    file_reqs = [r for r in stub.requests if r[1].startswith("/files/")]
    assert file_reqs and all(r[2].get("Authorization") == f"Bearer {KEY}" for r in file_reqs)  # same host
    # already there with the right hash: nothing downloaded again
    n = len(stub.requests)
    assert download(77, tmp_path, base_url=stub.base_url, retry=FAST, cache=False) == path
    assert stub.count("GET", "/files/") == len(file_reqs)
    assert len(stub.requests) == n + 1  # only the version lookup


def test_download_resumes_a_partial_file(stub, tmp_path):
    data, sha = serve_file(stub)
    (tmp_path / "base.safetensors.partial").write_bytes(data[:1_000_000])
    path = download(77, tmp_path, base_url=stub.base_url, retry=FAST, cache=False)
    assert open(path, "rb").read() == data
    file_reqs = [r for r in stub.requests if r[1].startswith("/files/")]
    assert file_reqs[0][2]["Range"] == "bytes=1000000-"


def test_download_dropped_connection_resumes(stub, tmp_path):
    data, sha = serve_file(stub)
    stub.script["GET /files/base.safetensors"] = [("cut", 500_000)]
    path = download(77, tmp_path, base_url=stub.base_url, retry=FAST, cache=False)
    assert open(path, "rb").read() == data
    file_reqs = [r for r in stub.requests if r[1].startswith("/files/")]
    assert len(file_reqs) == 2 and file_reqs[1][2].get("Range", "").startswith("bytes=")


def test_download_wrong_hash_is_deleted(stub, tmp_path):
    data, sha = serve_file(stub)
    with pytest.raises(DownloadError, match="expected"):
        download(77, tmp_path, sha256="0" * 63 + "1", base_url=stub.base_url, retry=FAST, cache=False)
    assert os.listdir(tmp_path) == []


def test_download_key_not_sent_to_another_host(tmp_path):
    with CivitaiStub(download_host="localhost") as stub:
        data, sha = serve_file(stub)
        path = download(77, tmp_path, base_url=stub.base_url, api_key=KEY, retry=FAST, cache=False)
        assert open(path, "rb").read() == data
        file_reqs = [r for r in stub.requests if r[1].startswith("/files/")]
        assert file_reqs and all("Authorization" not in r[2] for r in file_reqs)
        api = [r for r in stub.requests if r[1].startswith("/api/")]
        assert all(r[2].get("Authorization") == f"Bearer {KEY}" for r in api)


def test_download_by_url_with_name_from_server_and_errors(stub, tmp_path, db):
    data, sha = serve_file(stub, name="from_header.safetensors")
    url = f"http://127.0.0.1:{stub.port}/api/download/models/77"
    path = download(url, tmp_path, sha256=sha, base_url=stub.base_url, retry=FAST, cache=db)
    assert os.path.basename(path) == "from_header.safetensors"
    assert db.lookup(path).sha256 == sha  # recorded: no rehash later
    with pytest.raises(DownloadError, match="already exists"):
        download(url, tmp_path, base_url=stub.base_url, retry=FAST, cache=False)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"http://127.0.0.1:{stub.port}/files/nothing", tmp_path, retry=FAST, cache=False)
    with pytest.raises(DownloadError, match="no model version 5"):
        download(5, tmp_path, base_url=stub.base_url, retry=FAST, cache=False)
    with pytest.raises(DownloadError, match="does not exist"):
        download(77, tmp_path / "nope", base_url=stub.base_url, retry=FAST, cache=False)
    with pytest.raises(DownloadError, match="not a download address"):
        download("file:///etc/passwd", tmp_path, retry=FAST, cache=False)


def test_cli_lookup(stub, tmp_path, monkeypatch, capsys):
    import json as _json

    from merger_core.cli import main

    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(civitai.ENV_API_KEY, KEY)
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    sa = helpers.sha256_file(a)
    stub.add_version(make_version(11, 21, sa, base_model="SD 1.5", model_name="Alpha"))
    assert main(["lookup", "--base-url", stub.base_url, a, "6" * 64]) == 0
    out, err = capsys.readouterr()
    assert "Alpha" in out and "Base model: SD 1.5" in out and "Not on CivitAI" in out
    assert KEY not in out + err
    assert all(r[2].get("Authorization") == f"Bearer {KEY}" for r in stub.requests)
    n = len(stub.requests)
    assert main(["lookup", "--offline", "--json", a]) == 0
    rows = _json.loads(capsys.readouterr().out)
    assert rows[0]["civitai"]["model_name"] == "Alpha" and rows[0]["civitai"]["source"] == "cache"
    assert len(stub.requests) == n
    stub.script[f"GET /api/v1/model-versions/by-hash/{'7' * 64}"] = [400]
    assert main(["lookup", "--base-url", stub.base_url, "7" * 64]) == 1
    out, err = capsys.readouterr()
    assert "Lookup failed" in out and "HTTP 400" in out and KEY not in out + err
    assert main(["lookup", "not-a-hash"]) == 2


def test_lookup_report_takes_a_manifest(stub, db, tmp_path):
    from merger_core.manifest.scan import manifest_from_scan

    paths = [helpers.write_model(tmp_path / f"m{i}.safetensors", seed=i) for i in range(2)]
    stub.add_version(make_version(1, 2, helpers.sha256_file(paths[1]), base_model="NoobAI", trained_words=["w"]))
    report, words, base = lookup_report(manifest_from_scan(paths), cache=db, base_url=stub.base_url, retry=FAST)
    assert "m0.safetensors" in report and "m1.safetensors" in report
    assert (words, base) == ("w", "NoobAI")


def test_cli_scan_civitai_records_hashes_and_warns(stub, tmp_path, monkeypatch, capsys):
    import json as _json

    from merger_core.cli import main

    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(civitai.ENV_BASE_URL, stub.base_url)
    monkeypatch.setenv(civitai.ENV_API_KEY, KEY)
    folder = tmp_path / "models"
    folder.mkdir()
    a = helpers.write_model(folder / "a.safetensors", seed=1)
    b = helpers.write_model(folder / "b.safetensors", seed=2)
    stub.add_version(make_version(1, 10, helpers.sha256_file(a), base_model="SD 1.5", model_name="Alpha"))
    stub.add_version(make_version(2, 20, helpers.sha256_file(b), base_model="Illustrious"))
    target = tmp_path / "m.json"
    assert main(["scan", str(folder), "-o", str(target), "--civitai"]) == 0
    out = capsys.readouterr().out
    assert "CivitAI: 2 of 2 model(s) found" in out
    assert "warning: b.safetensors" in out and "Illustrious" in out
    doc = _json.loads(target.read_text())
    assert [m["sha256"] for m in doc["models"]] == [helpers.sha256_file(a), helpers.sha256_file(b)]
    assert doc["models"][0]["civitai"]["model_name"] == "Alpha"
    assert KEY not in target.read_text()
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 1
    # offline, from the cache; the manifest loads back
    assert main(["scan", str(folder), "-o", str(target), "--civitai", "--offline", "--overwrite"]) == 0
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 1
    from merger_core.manifest.parse import load_manifest

    assert load_manifest(str(target)).models[1].civitai["base_model"] == "Illustrious"


def test_enrich_manifest_uses_full_detection(stub, db, tmp_path):
    from merger_core.identity.civitai import detect_architecture
    from merger_core.merge.demo import sd15_full_layout

    p = helpers.write_sparse_checkpoint(tmp_path / "full15.safetensors", sd15_full_layout())
    assert detect_architecture(p) == "sd1"  # merger_core.analyze recognises the full layout
    stub.add_version(make_version(1, 2, helpers.sha256_file(p), base_model="Pony"))
    warnings = enrich_manifest([{"path": p}], cache=db, base_url=stub.base_url, retry=FAST)
    assert len(warnings) == 1 and "'Pony' (sdxl)" in warnings[0] and "sd1 (sd1)" in warnings[0]


# ---------------------------------------------------------------------------------------------------------------
# Answers that are not what the API documents, text that is not safe to print, bad settings, bad redirects


def _bad(**changes):
    v = make_version(31, 41, EXAMPLE_SHA)
    for path, value in changes.items():
        target = v
        *parents, last = path.split("__")
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return v


WRONG_TYPES = {
    "model is a string": _bad(model="oops"),
    "model is a list": _bad(model=[{"name": "x"}]),
    "files is a number": _bad(files=7),
    "files is an object": _bad(files={"name": "x"}),
    "a file is a list": _bad(files=[["x"]]),
    "hashes is a list": _bad(files__0__hashes=[EXAMPLE_SHA]),
    "metadata is a string": _bad(files__0__metadata="fp16"),
    "images is a string": _bad(images="x"),
    "trainedWords is a string": _bad(trainedWords="masterpiece"),
    "trainedWords holds an object": _bad(trainedWords=[{"w": 1}]),
}


@pytest.mark.parametrize("bad", list(WRONG_TYPES.values()), ids=list(WRONG_TYPES))
def test_single_answer_with_wrong_types_is_one_failed_lookup(stub, db, bad):
    stub.script[f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"] = [("json", bad)]
    r = ask(stub, [EXAMPLE_SHA], cache=db)[EXAMPLE_SHA.lower()]
    assert r.status == "error"
    assert "malformed" in r.message and "CivitAI" in r.message
    assert len(stub.requests) == 1  # not retried
    assert db.get_civitai(EXAMPLE_SHA) is None  # not remembered
    from merger_core.identity.civitai import format_result
    from merger_core.identity.hashing import FileHashes

    assert "Lookup failed: " in format_result("x", FileHashes(size=0, sha256=EXAMPLE_SHA.lower()), r)


def test_batch_answer_with_wrong_types_fails_only_that_entry(stub, db, tmp_path):
    paths = [helpers.write_model(tmp_path / f"{n}.safetensors", seed=i) for i, n in enumerate("abc")]
    shas = [helpers.sha256_file(p) for p in paths]
    good_a = make_version(1, 10, shas[0], base_model="SD 1.5")
    odd_b = make_version(2, 20, shas[1], base_model="SD 1.5")
    odd_b["model"] = "oops"
    odd_b["images"] = "x"
    good_c = make_version(3, 30, shas[2], base_model="SD 1.5")
    stub.script["POST /api/v1/model-versions/by-hash"] = [("json", [good_a, odd_b, "not a version", good_c])]
    m = Manifest([Entry(p) for p in paths])
    warnings = enrich_manifest(m, cache=db, base_url=stub.base_url, retry=FAST)
    assert [e.civitai["status"] for e in m.models] == ["found", "error", "found"]
    assert m.models[0].civitai["version_id"] == 1 and m.models[2].civitai["version_id"] == 3
    assert "malformed" in m.models[1].civitai["message"]
    assert len(warnings) == 1 and warnings[0].startswith("b.safetensors: CivitAI lookup failed") and "malformed" in warnings[0]
    assert db.get_civitai(shas[1]) is None and db.get_civitai(shas[0]).found
    assert stub.count("POST", "/api/v1/model-versions/by-hash") == 1


def test_batch_answer_with_unreadable_files_is_not_taken_for_a_miss(stub, db):
    shas = [hashlib.sha256(f"u{i}".encode()).hexdigest() for i in range(3)]
    good = make_version(1, 10, shas[0])
    unreadable = make_version(2, 20, shas[1])
    unreadable["files"] = 7  # which hash it answers cannot be told
    stub.script["POST /api/v1/model-versions/by-hash"] = [("json", [good, unreadable])]
    res = ask(stub, shas, cache=db)
    assert res[shas[0]].found
    for s in shas[1:]:  # not "not on CivitAI" (that would be remembered for a week): unknown
        assert res[s].status == "error" and "malformed" in res[s].message
        assert db.get_civitai(s) is None


CONTROL = ["\x1b", "\x07", "\r", "\x00", "\x7f", "\x9b", "\u202e", "\u2066", "\u2069"]


def assert_printable(text):
    bad = [c for c in CONTROL if c in text]
    assert not bad, f"control characters {bad!r} in {text!r}"


def test_printable_strips_control_characters_only():
    from merger_core.identity.civitai import printable

    assert printable("a\x1b]0;pwned\x07b\r\n\tc\x00\x7f\x85\x9bd\u202ae\u202ef\u2066g\u2069h") == "a]0;pwnedbcdefgh"
    assert printable("Ünïcødé 日本語 — ok ‘quotes’ \u200d👍") == "Ünïcødé 日本語 — ok ‘quotes’ \u200d👍"
    assert printable(None) == ""


def test_server_text_is_stripped_before_printing(stub, db, tmp_path):
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    sa = helpers.sha256_file(a)
    v = make_version(
        11, 21, sa, model_name="Evil\x1b]0;pwned\x07 Model \u00dcber", name="v1\r  Model: forged",
        base_model="SD 1.5\x1b[2J", model_type="Check\x9bpoint", trained_words=["\u202egnp.exe", "日本\x1b[31m"],
    )
    v["images"][0]["url"] = "https://image.example/\x1b[2Jx.jpeg"
    stub.add_version(v)
    report, words, base = lookup_report([a], cache=db, base_url=stub.base_url, retry=FAST)
    for text in (report, words, base):
        assert_printable(text)
    assert "Model: Evil]0;pwned Model \u00dcber / version v1  Model: forged" in report
    assert "Base model: SD 1.5[2J; type: Checkpoint" in report
    assert words == "gnp.exe, 日本[31m"
    assert "https://image.example/[2Jx.jpeg" in report
    # the same answer from the cache, and in a manifest's warnings
    report2, _, _ = lookup_report([a], offline=True, cache=db, base_url=stub.base_url)
    assert_printable(report2)
    assert "From the cache" in report2 and "Evil]0;pwned" in report2
    warnings = enrich_manifest([{"path": a}], cache=db, base_url=stub.base_url, offline=True)
    assert warnings and "'SD 1.5[2J'" in warnings[0]
    for w in warnings:
        assert_printable(w)
    # an error body sent by the server
    b = "8" * 64
    stub.script[f"GET /api/v1/model-versions/by-hash/{b.upper()}"] = [("error", 400, "bad\x1b[2J\r\u202ething\x07")]
    from merger_core.identity.civitai import format_result
    from merger_core.identity.hashing import FileHashes

    r = ask(stub, [b])[b]
    text = format_result(b, FileHashes(size=0, sha256=b), r)
    assert_printable(text)
    assert "HTTP 400 (bad[2Jthing)" in text


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-1", "0", "601"])
def test_cli_lookup_refuses_a_bad_timeout(stub, tmp_path, monkeypatch, capsys, value):
    from merger_core.cli import main

    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))
    a = helpers.write_model(tmp_path / "a.safetensors", seed=1)
    timeout = ["--timeout", value] if not value.startswith("-inf") else [f"--timeout={value}"]  # argparse: an option
    assert main(["lookup", a, "--base-url", stub.base_url, *timeout]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.startswith("error: ") and "timeout" in err and "600" in err and err.count("\n") == 1
    assert stub.requests == []


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0, -5, 601, 1e9, True, "30"])
def test_library_refuses_a_bad_timeout_before_any_request(stub, value):
    from merger_core.errors import ModelMergerError

    with pytest.raises(ModelMergerError, match="timeout"):
        CivitaiClient(stub.base_url, timeout=value)
    with pytest.raises(ModelMergerError, match="timeout"):
        ask(stub, [EXAMPLE_SHA], timeout=value)
    assert stub.requests == []
    assert CivitaiClient(stub.base_url, timeout=600).timeout == 600.0
    assert CivitaiClient(stub.base_url, timeout=None).timeout == civitai.client.DEFAULT_TIMEOUT


@pytest.mark.parametrize("target", ["ftp://files.example/x.safetensors", "file:///etc/passwd"])
def test_redirect_to_a_non_http_address_fails_at_once(stub, target):
    stub.script[f"GET /api/v1/model-versions/by-hash/{EXAMPLE_SHA}"] = [("redirect", target)]
    r = ask(stub, [EXAMPLE_SHA], retry=RetryPolicy(max_retries=3, backoff_start=5, backoff_max=5))
    r = r[EXAMPLE_SHA.lower()]
    assert r.status == "error" and "not an http" in r.message
    assert "passwd" not in r.message and "ftp:" not in r.message
    assert len(stub.requests) == 1


@pytest.mark.parametrize("target", ["ftp://files.example/x.safetensors", "file:///etc/passwd"])
def test_download_redirect_to_a_non_http_address_fails_at_once(stub, tmp_path, target):
    serve_file(stub)
    stub.script["GET /api/download/models/77"] = [("redirect", target)]
    with pytest.raises(DownloadError, match="not an http"):
        download(77, tmp_path, base_url=stub.base_url, cache=False,
                 retry=RetryPolicy(max_retries=3, backoff_start=5, backoff_max=5))
    assert stub.count("GET", "/api/download/models/77") == 1
    assert helpers.leftovers(tmp_path) == []
