"""Real processes and real signals: Ctrl-C, a second Ctrl-C, SIGTERM, SIGHUP and SIGKILL during a merge.

Every case checks the promise: a clear message, the documented exit status, no traceback, and no file left behind
(a SIGKILL's temporary file is removed by the next run for the same target, which says so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _inputs(tmp_path, keys=4, side=4096, method="weighted_sum"):
    layout = {f"model.diffusion_model.big.{i}.weight": ("F16", (side, side)) for i in range(keys)}
    layout[helpers.KEY_POSITION_IDS] = ("I64", (1, 77))
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [helpers.write_sparse_checkpoint(folder / f"{n}.safetensors", layout) for n in "abc"]
    doc = {"version": 1, "method": method, "models": [{"path": os.path.basename(p)} for p in paths]}
    if method == "ties":
        doc = {"version": 1, "method": "ties", "base": os.path.basename(paths[0]),
               "models": [{"path": os.path.basename(p)} for p in paths[1:]]}
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps(doc))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return manifest, out_dir


def _start(manifest, out, supervised=True):
    env = _env()
    if not supervised:  # the engine's own process, as a library user or a killed supervisor leaves it
        env["MODEL_MERGER_SUPERVISED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", "merger_core", "merge", str(manifest), "-o", str(out), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(out.parent),
    )


def _wait_for_partial(proc, folder, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if helpers.leftovers(folder):
            return True
        time.sleep(0.005)
    out, err = proc.communicate(timeout=60)
    pytest.fail(f"the merge ended before a signal could be sent (rc {proc.returncode}): {err.decode()[-800:]}")


@pytest.mark.parametrize("sig, code, name", [
    (signal.SIGINT, 130, "SIGINT"),
    (signal.SIGTERM, 143, "SIGTERM"),
    (signal.SIGHUP, 129, "SIGHUP"),
])
def test_a_signal_stops_the_merge_cleanly(tmp_path, sig, code, name):
    manifest, out_dir = _inputs(tmp_path)
    proc = _start(manifest, out_dir / "merged.safetensors")
    _wait_for_partial(proc, out_dir)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == code, text[-2000:]
    assert f"interrupted ({name}); no output was written" in text
    assert "Traceback" not in text
    assert os.listdir(out_dir) == []


def test_a_second_ctrl_c_forces_and_still_leaves_nothing(tmp_path):
    # one big key merged with TIES takes seconds, so the second signal lands inside it
    manifest, out_dir = _inputs(tmp_path, keys=2, side=8192, method="ties")
    proc = _start(manifest, out_dir / "merged.safetensors")
    _wait_for_partial(proc, out_dir)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 130, text[-2000:]
    assert "stopping after the current tensor" in text
    assert "Traceback" not in text
    assert os.listdir(out_dir) == []


def test_a_killed_merge_process_is_reported_and_cleaned_up_by_its_supervisor(tmp_path):
    """The OOM killer picks the big process: the merging child. The console command's parent says so and removes
    the temporary file."""
    manifest, out_dir = _inputs(tmp_path)
    proc = _start(manifest, out_dir / "merged.safetensors")
    _wait_for_partial(proc, out_dir)
    child_pid = int(helpers.leftovers(out_dir)[0].split(".")[-3])  # .NAME.PID.TID.partial
    assert child_pid != proc.pid
    os.kill(child_pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 2, text
    assert "the merge process was killed (SIGKILL" in text and "no output was written" in text
    assert "Traceback" not in text
    assert os.listdir(out_dir) == []


def test_a_killed_run_leaves_a_partial_that_the_next_run_removes(tmp_path):
    manifest, out_dir = _inputs(tmp_path)
    target = out_dir / "merged.safetensors"
    proc = _start(manifest, target, supervised=False)
    _wait_for_partial(proc, out_dir)
    proc.kill()
    proc.communicate(timeout=60)
    stale = helpers.leftovers(out_dir)
    assert len(stale) == 1 and stale[0].startswith(".merged.safetensors.")  # SIGKILL cannot be caught
    # a partial of a live process (this one) or of another target is never touched
    live = out_dir / f".merged.safetensors.{os.getpid()}.1.partial"
    live.write_bytes(b"x")
    other = out_dir / ".other.safetensors.999999999.1.partial"
    other.write_bytes(b"x")
    done = subprocess.run(
        [sys.executable, "-m", "merger_core", "merge", str(manifest), "-o", str(target), "--no-progress"],
        capture_output=True, text=True, env=_env(), timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"removed {out_dir / stale[0]}, a temporary file left by an earlier run that was killed" in done.stdout
    assert sorted(os.listdir(out_dir)) == sorted(["merged.safetensors", live.name, other.name])


def test_a_bus_error_in_the_merge_process_is_one_clear_line_and_no_partial(tmp_path, capsys):
    """What the kernel does when a memory-mapped input shrinks under a read: SIGBUS, no Python code runs. The
    supervisor reports it and removes the dead child's temporary file."""
    from merger_core.cli import build_parser
    from merger_core.cli._supervise import run_supervised

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    target = out_dir / "merged.safetensors"
    child = (
        "import os, signal, sys\n"
        f"open(os.path.join({str(out_dir)!r}, '.merged.safetensors.%d.1.partial' % os.getpid()), 'wb').write(b'x')\n"
        "os.kill(os.getpid(), signal.SIGBUS)\n"
    )
    rc = run_supervised(["merge", "m.json", "-o", str(target)], build_parser, child_cmd=[sys.executable, "-c", child])
    err = capsys.readouterr().err
    assert rc == 2
    assert "an input file was truncated or overwritten while it was being read (bus error)" in err
    assert "removed its temporary file" in err and os.listdir(out_dir) == []


def test_an_input_truncated_during_a_real_merge_never_leaves_a_partial(tmp_path):
    """A real truncation while a big key is read: either the check before the next key stops the merge with a
    message (exit 2), or the read faults and the supervisor reports the bus error (exit 2). Never a silent crash."""
    layout = {"model.diffusion_model.big.weight": ("F16", (16384, 8192)), helpers.KEY_POSITION_IDS: ("I64", (1, 77))}
    folder = tmp_path / "in"
    folder.mkdir()
    paths = [helpers.write_sparse_checkpoint(folder / f"{n}.safetensors", layout) for n in "abc"]
    manifest = folder / "manifest.json"
    manifest.write_text(json.dumps({"version": 1, "method": "ties", "base": "a.safetensors",
                                    "models": [{"path": "b.safetensors"}, {"path": "c.safetensors"}]}))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _start(manifest, out_dir / "merged.safetensors")
    _wait_for_partial(proc, out_dir)
    time.sleep(0.2)
    os.truncate(paths[1], 4096)
    out, err = proc.communicate(timeout=120)
    text = err.decode()
    assert proc.returncode == 2, text[-2000:]
    assert ("bus error" in text) or ("changed while it was being merged" in text), text[-2000:]
    assert "Traceback" not in text and os.listdir(out_dir) == [], text
