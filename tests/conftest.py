"""Shared fixtures. The plain functions behind them, the stubs and the float64 oracle are in ``support/``, which
is put on ``sys.path`` here (``import helpers``, ``from oracle import ...``)."""

from __future__ import annotations

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "support"))

import helpers  # noqa: E402

# Tests never touch the user's own data folder (hash cache, base registry): everything goes to a fresh folder.
os.environ["MODEL_MERGER_HOME"] = tempfile.mkdtemp(prefix="model-merger-home-")

SHARED_LAYOUTS = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "layouts")


@pytest.fixture
def make_models(tmp_path):
    """``make_models(n, dtypes=None, folder=None, **write_model_kw) -> [paths]``: small SD1.5-keyed checkpoints."""

    def make(n: int, dtypes=None, folder=None, **kw):
        return helpers.write_models(folder or tmp_path / "in", n, dtypes=dtypes, **kw)

    return make


@pytest.fixture
def two_models(make_models):
    return make_models(2)


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def shared_layout():
    """``shared_layout(name) -> dict`` from ../shared/layouts (skips when that folder is not beside the repo)."""
    import json

    def load(name: str):
        path = os.path.join(SHARED_LAYOUTS, name if name.endswith(".json") else name + ".json")
        if not os.path.exists(path):
            pytest.skip(f"{path} is not available here")
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    return load


def permissions_apply(folder) -> bool:
    """True when file modes stop this process (not root, or root without CAP_DAC_OVERRIDE): tried, not guessed."""
    probe = os.path.join(folder, ".perm-probe")
    with open(probe, "w") as f:
        f.write("x")
    os.chmod(probe, 0)
    try:
        with open(probe):
            return False
    except PermissionError:
        return True
    finally:
        os.chmod(probe, 0o600)
        os.unlink(probe)


@pytest.fixture
def not_root(tmp_path):
    """Skips the test where file permissions do not stop this process (root)."""
    if not permissions_apply(tmp_path):
        pytest.skip("file permissions do not stop this process (root)")


@pytest.fixture
def comfy(tmp_path, monkeypatch):
    """The stand-in ComfyUI host (``support/comfy_stub.py``) with the pack loaded: ``(host, pack)``."""
    import comfy_stub

    monkeypatch.delenv("MODEL_MERGER_ALLOW_ANY_FOLDER", raising=False)
    monkeypatch.delenv("CIVITAI_API_KEY", raising=False)
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "mmhome"))
    host, pack = comfy_stub.install(str(tmp_path / "comfy"))
    yield host, pack
    comfy_stub.uninstall()


@pytest.fixture
def ckpts(comfy):
    """Three small SD1.5-keyed checkpoints in the stand-in host's checkpoints folder."""
    host, _ = comfy
    return helpers.write_models(os.path.join(host.base, "models", "checkpoints"), 3)

