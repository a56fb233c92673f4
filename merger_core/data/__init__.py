"""The data files (architectures, marker keys, ModelSpec labels, block presets, the manifest schema, CivitAI's
base-model names) and the one way to find them."""

from __future__ import annotations

import json
import os

DATA_DIR = os.path.dirname(os.path.abspath(__file__))


def data_path(*parts: str) -> str:
    return os.path.join(DATA_DIR, *parts)


def load_json(*parts: str):
    with open(data_path(*parts), encoding="utf-8") as f:
        return json.load(f)
