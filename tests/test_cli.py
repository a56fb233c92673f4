"""The command line: ``merger_core.cli.main([...])`` in-process, plus real subprocess runs (demo, Ctrl-C)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest

import helpers
from merger_core.host import notify
from merger_core.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def models(make_models, tmp_path):
    paths = make_models(3, folder=tmp_path / "models")
    (tmp_path / "models" / "old.ckpt").write_bytes(b"not really a pickle")
    return paths


def scan_manifest(capsys, tmp_path, *extra):
    rc, out, err = run_cli(capsys, "scan", tmp_path / "models", *extra)
    assert rc == 0, err
    return tmp_path / "models" / "manifest.json", out


# ---------------------------------------------------------------------------------------------------------------
# scan


def test_scan_folder_writes_manifest_at_the_common_folder(capsys, tmp_path, models):
    manifest, out = scan_manifest(capsys, tmp_path)
    for p in models:
        assert p in out
    assert "3 model(s) found" in out
    assert "old.ckpt" in out and "pickle" in out  # skipped, with the reason
    assert f"manifest written: {manifest}" in out
    data = json.loads(manifest.read_text())
    assert [m["path"] for m in data["models"]] == ["model-0.safetensors", "model-1.safetensors", "model-2.safetensors"]
    assert [m["weight"] for m in data["models"]] == [1.0, 1.0, 1.0]


def test_scan_pattern_with_output_and_weights(capsys, tmp_path, models):
    target = tmp_path / "recipes" / "mix.json"
    target.parent.mkdir()
    rc, out, err = run_cli(capsys, "scan", str(tmp_path / "models" / "model-[01].safetensors"),
                           str(tmp_path / "models" / "model-2.safetensors"), "-o", target, "--weights", "0.5,0.3", "0.2",
                           "--dtype", "bf16")
    assert rc == 0, err
    data = json.loads(target.read_text())
    assert [m["weight"] for m in data["models"]] == [0.5, 0.3, 0.2]
    assert data["dtype"] == "bf16"
    # outside the manifest's folder, so written as absolute paths
    assert [m["path"] for m in data["models"]] == [os.path.abspath(p).replace(os.sep, "/") for p in models]


def test_scan_weights_by_name(capsys, tmp_path, models):
    manifest, _ = scan_manifest(capsys, tmp_path, "--weights", "model-2.safetensors=3", "model-0.safetensors=0.5")
    data = json.loads(manifest.read_text())
    assert [m["weight"] for m in data["models"]] == [0.5, 1.0, 3.0]


@pytest.mark.parametrize("weights, words", [(["1", "x"], "'x' is not a number"), (["1", "a=2"], "not both"),
                                            (["1", "2"], "2 weights given for 3 models")])
def test_scan_bad_weights(capsys, tmp_path, models, weights, words):
    rc, out, err = run_cli(capsys, "scan", tmp_path / "models", "--weights", *weights)
    assert rc == 2 and words in err
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_scan_filter_and_dry_run(capsys, tmp_path, models):
    rc, out, err = run_cli(capsys, "scan", tmp_path / "models", "--filter", "*-1.safetensors", "--dry-run")
    assert rc == 0, err
    assert models[1] in out and models[0] not in out
    assert "1 model(s) found" in out and "at least 2 models" in out
    assert "no manifest written" in out
    assert not (tmp_path / "models" / "manifest.json").exists()


def test_scan_no_match_names_the_pattern(capsys, tmp_path, models):
    pattern = str(tmp_path / "models" / "pony*.safetensors")
    rc, out, err = run_cli(capsys, "scan", pattern)
    assert rc == 2
    assert "error:" in err and pattern in err


def test_scan_refuses_to_replace_a_manifest(capsys, tmp_path, models):
    manifest, _ = scan_manifest(capsys, tmp_path)
    manifest.write_text("hand-edited")
    rc, out, err = run_cli(capsys, "scan", tmp_path / "models")
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert manifest.read_text() == "hand-edited"
    scan_manifest(capsys, tmp_path, "--overwrite")
    assert json.loads(manifest.read_text())["version"] == 1


# ---------------------------------------------------------------------------------------------------------------
# merge


def test_scan_then_merge_matches_reference(capsys, tmp_path, models):
    manifest, _ = scan_manifest(capsys, tmp_path, "--weights", "0.6", "0.3", "0.1")
    before = helpers.hashes(models)
    out_file = tmp_path / "merged.safetensors"
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", out_file)
    assert rc == 0, err
    assert "merging 3 models with weighted_sum" in out
    assert "0.6" in out and "model-0.safetensors" in out
    assert f"wrote {out_file}" in out and "1131 tensors" in out
    assert "keys 1131/1131" in err  # the progress bar
    ref, bound = helpers.reference_merge(models, [0.6, 0.3, 0.1])
    report = helpers.check_against_reference(str(out_file), ref, bound, 3)
    assert report.ok, report.problems[:3]
    assert helpers.hashes(models) == before
    sha = helpers.data_sha256(out_file)
    assert sha in out


def test_merge_dtype_override_and_no_progress(capsys, tmp_path, models):
    manifest, _ = scan_manifest(capsys, tmp_path)
    out_file = tmp_path / "merged.safetensors"
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", out_file, "--dtype", "fp32", "--no-progress",
                           "--device", "auto")
    assert rc == 0, err
    assert "dtype fp32, device " in out
    assert "keys 1131" not in err and err == ""
    h, _ = helpers.raw_header(out_file)
    assert h[helpers.KEY_CONV_IN]["dtype"] == "F32"
    assert h[helpers.KEY_POSITION_IDS]["dtype"] == "I64"


def test_merge_existing_output(capsys, tmp_path, models):
    manifest, _ = scan_manifest(capsys, tmp_path)
    out_file = tmp_path / "merged.safetensors"
    out_file.write_bytes(b"keep me")
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", out_file, "--no-progress")
    assert rc == 2 and "already exists" in err and "--overwrite" in err
    assert out_file.read_bytes() == b"keep me"
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", out_file, "--no-progress", "--overwrite")
    assert rc == 0, err
    assert out_file.read_bytes()[:8] != b"keep me"[:8]


def test_merge_preflight_report_and_allow_missing(capsys, tmp_path, models):
    helpers.write_model(tmp_path / "models" / "model-3.safetensors", seed=9, drop=[helpers.KEY_CONV_IN])
    manifest, _ = scan_manifest(capsys, tmp_path)
    before = helpers.hashes(models)
    out_file = tmp_path / "merged.safetensors"
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", out_file, "--no-progress")
    assert rc == 2
    assert "preflight" in out and "no weight was read" in out
    assert "model-3.safetensors lacks 1 of 1131 keys" in err and helpers.KEY_CONV_IN in err
    assert "--allow-missing" in err
    assert not out_file.exists() and helpers.leftovers(tmp_path) == []
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", out_file, "--no-progress", "--allow-missing")
    assert rc == 0, err
    assert "note: merged with missing keys" in out
    paths = [*models, str(tmp_path / "models" / "model-3.safetensors")]
    ref, bound = helpers.reference_merge(paths, [1, 1, 1, 1], allow_missing=True)
    assert helpers.check_against_reference(str(out_file), ref, bound, 4).ok
    assert helpers.hashes(models) == before


def test_merge_shape_mismatch_report(capsys, tmp_path, models):
    helpers.write_model(tmp_path / "models" / "model-3.safetensors", seed=9,
                        reshape={helpers.KEY_OUT: (4, 16, 3, 3), helpers.KEY_CONV_IN: (8, 4, 1, 1)})
    manifest, _ = scan_manifest(capsys, tmp_path)
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "m.safetensors", "--allow-missing")
    assert rc == 2
    assert "2 keys differ in shape" in err and "model-3.safetensors: [8, 4, 1, 1]" in err


def test_merge_bad_device(capsys, tmp_path, models):
    manifest, _ = scan_manifest(capsys, tmp_path)
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "m.safetensors", "--device", "cuda:3")
    assert rc == 2 and "cuda:3" in err and "available here: cpu" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_merge_bad_manifest_weight(capsys, tmp_path, models):
    manifest, _ = scan_manifest(capsys, tmp_path)
    data = json.loads(manifest.read_text())
    data["models"][1]["weight"] = -2
    manifest.write_text(json.dumps(data))
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "m.safetensors")
    assert rc == 2 and "models[1] (model-1.safetensors)" in err and "weight" in err


def test_merge_missing_manifest(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "merge", tmp_path / "nope.json", "-o", tmp_path / "m.safetensors")
    assert rc == 2 and "nope.json" in err


def test_merge_interrupted_in_process(capsys, tmp_path, models, monkeypatch):
    """Ctrl-C during the merge (KeyboardInterrupt raised from the progress callback): exit 130, nothing left."""
    from merger_core.cli import _progress

    manifest, _ = scan_manifest(capsys, tmp_path)
    seen = []
    real_call = _progress.ProgressBar.__call__

    def call(self, info):
        real_call(self, info)
        if info.keys_done == 500:
            seen.extend(helpers.leftovers(tmp_path))
            raise KeyboardInterrupt

    monkeypatch.setattr(_progress.ProgressBar, "__call__", call)
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "merged.safetensors")
    assert rc == 130
    assert "interrupted" in err
    assert seen, "a temporary file should have existed mid-run"
    assert helpers.leftovers(tmp_path) == [] and not (tmp_path / "merged.safetensors").exists()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_merge_ctrl_c_in_a_real_process(tmp_path):
    """A real SIGINT to a running ``model-merger merge``: exit 130, the temporary file removed, no output."""
    layout = {f"model.diffusion_model.big.{i}.weight": ("F16", (4096, 4096)) for i in range(4)}
    layout[helpers.KEY_POSITION_IDS] = ("I64", (1, 77))
    folder = tmp_path / "big"
    folder.mkdir()
    paths = [helpers.write_sparse_checkpoint(folder / f"{n}.safetensors", layout) for n in "abc"]
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"version": 1, "models": [{"path": os.path.basename(p)} for p in paths]}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "merger_core", "merge", str(manifest), "-o", str(out_dir / "merged.safetensors")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=str(tmp_path),
    )
    deadline = time.monotonic() + 120
    saw_partial = False
    while time.monotonic() < deadline and proc.poll() is None:
        if helpers.leftovers(out_dir):
            saw_partial = True
            time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    if not saw_partial:
        pytest.fail(f"the merge ended before it could be interrupted (rc {proc.returncode}): {err.decode()[-500:]}")
    assert proc.returncode == 130, err.decode()[-2000:]
    assert b"interrupted" in err
    assert os.listdir(out_dir) == []


# ---------------------------------------------------------------------------------------------------------------
# notify


@pytest.fixture
def no_notifier(monkeypatch):
    monkeypatch.setattr(notify, "desktop_notifier_installed", lambda: False)
    notify.reset_for_tests()
    yield
    notify.reset_for_tests()


def test_notify_without_the_package_rings_the_bell_once(capsys, tmp_path, models, no_notifier):
    manifest, _ = scan_manifest(capsys, tmp_path)
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "a.safetensors", "--notify",
                           "--notify-after", "0", "--no-progress")
    assert rc == 0
    assert err.count("desktop-notifier") == 1 and "model-merger[notify]" in err and err.endswith("\a")
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "b.safetensors", "--notify",
                           "--notify-after", "0", "--no-progress")
    assert err == "\a"  # explained once per process
    # a failed run notifies too
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "b.safetensors", "--notify",
                           "--notify-after", "0", "--no-progress")
    assert rc == 2 and "\a" in err


def test_notify_only_after_the_threshold(capsys, tmp_path, models, no_notifier):
    manifest, _ = scan_manifest(capsys, tmp_path)
    rc, out, err = run_cli(capsys, "merge", manifest, "-o", tmp_path / "a.safetensors", "--notify", "--no-progress")
    assert rc == 0 and "\a" not in err and err == ""  # default threshold 30 s; this run is far shorter


def _fake_desktop_notifier(monkeypatch, send):
    """Stand-in for the optional package (not installed in CI): exercises our glue code, not the package."""
    import importlib.machinery

    mod = types.ModuleType("desktop_notifier")
    mod.__spec__ = importlib.machinery.ModuleSpec("desktop_notifier", None)

    class DesktopNotifier:
        def __init__(self, app_name="Python", **kw):
            self.app_name = app_name

        async def send(self, title, message, **kw):
            return send(self.app_name, title, message)

    mod.DesktopNotifier = DesktopNotifier
    monkeypatch.setitem(sys.modules, "desktop_notifier", mod)
    notify.reset_for_tests()


def test_notify_done_uses_desktop_notifier(monkeypatch, capsys):
    sent = []
    _fake_desktop_notifier(monkeypatch, lambda *a: sent.append(a))
    assert notify.notify_done("Done", "merged.safetensors written") == "desktop"
    assert sent == [("Model Merger", "Done", "merged.safetensors written")]
    assert capsys.readouterr().err == ""


def test_notify_done_falls_back_when_the_service_fails(monkeypatch, capsys):
    def broken(*a):
        raise ConnectionError("no D-Bus session")

    _fake_desktop_notifier(monkeypatch, broken)
    assert notify.notify_done("Done", "x") == "bell"
    err = capsys.readouterr().err
    assert "no D-Bus session" in err and err.endswith("\a")
    assert notify.notify_done("Done", "x", bell=False) == "none"
    assert capsys.readouterr().err == ""


def test_notify_done_sees_failures_the_package_only_logs(monkeypatch, capsys):
    """desktop-notifier 5/6 catch the platform's error, log "Notification failed" with the traceback and return
    normally; that must count as a failure, and the traceback must not reach the console."""
    import logging

    def logs_failure(*a):
        try:
            raise OSError("DBUS_SESSION_BUS_ADDRESS not set")
        except OSError:
            logging.getLogger("desktop_notifier.backends.base").warning("Notification failed", exc_info=True)

    _fake_desktop_notifier(monkeypatch, logs_failure)
    assert notify.notify_done("Done", "x") == "bell"
    err = capsys.readouterr().err
    assert "DBUS_SESSION_BUS_ADDRESS not set" in err and "Traceback" not in err and err.endswith("\a")


@pytest.mark.skipif(not notify.desktop_notifier_installed() or bool(os.environ.get("DBUS_SESSION_BUS_ADDRESS"))
                    or bool(os.environ.get("DISPLAY")) or sys.platform != "linux",
                    reason="needs the real desktop-notifier on a headless Linux machine")
def test_real_desktop_notifier_on_a_headless_machine(capsys):
    notify.reset_for_tests()
    assert notify.notify_done("Model Merger test", "headless") == "bell"
    err = capsys.readouterr().err
    assert "desktop notification failed" in err and "Traceback" not in err


def test_notify_done_never_raises_on_a_closed_stream(no_notifier):
    import io

    s = io.StringIO()
    s.close()
    assert notify.notify_done("t", "m", stream=s) == "none"


# ---------------------------------------------------------------------------------------------------------------
# demo


def test_demo_in_process(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "demo", tmp_path / "d", "--no-progress")
    assert rc == 0, out + err
    assert "demo passed" in out and "1130 float tensors" in out and "SD1 layout, non-standard widths" in out and "1 integer/marker tensors bit-exact" in out
    assert (tmp_path / "d" / "merged.safetensors").exists()
    assert (tmp_path / "d" / "inputs" / "manifest.json").exists()
    first = helpers.sha256_file(tmp_path / "d" / "merged.safetensors")
    rc, out, err = run_cli(capsys, "demo", tmp_path / "d", "--no-progress")  # again: same bytes
    assert rc == 0 and helpers.sha256_file(tmp_path / "d" / "merged.safetensors") == first


def test_demo_check_fails_on_a_wrong_merge(capsys, tmp_path, monkeypatch):
    """The demo's exit status depends on its check: a merge with a wrong weight must fail it."""
    from merger_core.merge import runner as engine

    real = engine._Runner.key_weights

    def skewed(self, job):
        w = real(self, job)
        return [w[0] * 1.01, *w[1:]]

    monkeypatch.setattr(engine._Runner, "key_weights", skewed)
    rc, out, err = run_cli(capsys, "demo", tmp_path / "d", "--no-progress")
    assert rc == 1 and "demo FAILED" in out and "problem:" in out


def test_demo_as_a_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "merger_core", "demo", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo passed" in proc.stdout
    assert "SD1 layout, non-standard widths" in proc.stdout


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "0.6.0" in capsys.readouterr().out
    for cmd in ("scan", "merge", "demo"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert cmd in capsys.readouterr().out


def test_merge_records_output_autov3_from_the_writer(tmp_path, make_models):
    """The CLI stores the writer's tensor-data hash, so hashing the output later needs no AutoV3 pass."""
    import json as _json

    from merger_core.identity.cache import open_cache
    from merger_core.cli import main as cli_main
    from merger_core.io.writer import tensor_data_sha256

    paths = make_models(2)
    manifest = tmp_path / "m.json"
    manifest.write_text(_json.dumps({"version": 1, "models": [{"path": str(p)} for p in paths]}))
    out = tmp_path / "merged.safetensors"
    assert cli_main(["merge", str(manifest), "-o", str(out), "--no-progress"]) == 0
    cached = open_cache().lookup(str(out), ["autov3"])
    assert cached is not None and cached.autov3 == tensor_data_sha256(out)
