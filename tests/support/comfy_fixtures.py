"""Full-size SD1.5-layout checkpoints for the tests against a real ComfyUI (and a CLI to make them ahead of time).

ComfyUI recognises a checkpoint from its key names and shapes only, so a small UNet is not detected: the files
must have the real SD1.5 layout (2.1 GB in fp16). Values are seeded random numbers with a small spread (so a
sampler run gives finite numbers); norm weights are 1. Files are written once and reused.

    python tests/comfy_fixtures.py [DIR] [COUNT]
"""

from __future__ import annotations

import json
import os
import struct
import sys

LAYOUT = os.environ.get("MODEL_MERGER_SD15_LAYOUT", "/work/shared/layouts/sd15.json")
DEFAULT_DIR = os.environ.get("MODEL_MERGER_BENCH_DATA", "/work/bench-data/comfy")
NAMES = ["sd15_a", "sd15_b", "sd15_c", "sd15_d"]


def load_layout(path: str = LAYOUT):
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in data["tensors"].items()}


def write_checkpoint(path: str, layout, seed: int) -> None:
    """Write one SD1.5-layout fp16 checkpoint, tensor by tensor (bounded memory), via a temporary file."""
    import torch

    assert all(dt == "F16" for _, dt in layout.values()), "only fp16 layouts are supported here"
    header = {}
    offset = 0
    keys = sorted(layout)
    for k in keys:
        shape, dt = layout[k]
        n = 2
        for s in shape:
            n *= s
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", "model_merger.test_fixture": f"sd15 random seed {seed}"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k in keys:
            shape, _ = layout[k]
            if ("norm" in k or k.endswith("ln_final.weight")) and k.endswith(".weight") and len(shape) == 1:
                t = torch.ones(shape, dtype=torch.float16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.float16)
            f.write(t.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_checkpoints(directory: str = DEFAULT_DIR, count: int = 4):
    """Paths of ``count`` SD1.5-layout checkpoints in ``directory``, writing the missing ones."""
    os.makedirs(directory, exist_ok=True)
    layout = None
    paths = []
    for i, name in enumerate(NAMES[:count]):
        p = os.path.join(directory, name + ".safetensors")
        if not os.path.exists(p):
            layout = layout or load_layout()
            write_checkpoint(p, layout, seed=1000 + i)
        paths.append(p)
    return paths


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR
    c = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    for p in ensure_checkpoints(d, c):
        print(p, os.path.getsize(p))
