"""The device path (whole keys through staging buffers, as on CUDA and MPS) against the CPU's chunked path, both run
here on the CPU: the same bytes for every method. This checks the device path's logic and its order of operations
wherever there is no GPU; bench/gpu_check.py compares a real CUDA run with the CPU (docs/formats.md, determinism)."""

from __future__ import annotations

import pytest
import torch

import helpers
from merger_core.merge import runner
from merger_core.merge.runner import merge_to_state_dict

CASES = [
    ("weighted_sum", {}, 3, "fp16"),
    ("weighted_sum", {}, 3, "bf16"),
    ("add_difference", {"alpha": 0.7}, 3, "fp16"),
    ("task_arithmetic", {"scale": 0.8}, 3, "fp32"),
    ("ties", {"density": 0.3}, 3, "fp16"),
    ("dare", {"drop": 0.4}, 3, "fp16"),
    ("slerp", {"t": 0.3}, 2, "fp16"),
    ("train_difference", {"alpha": 0.7}, 3, "fp16"),
    ("weighted_sum", {}, 2, "fp8_scaled"),
]


@pytest.mark.parametrize("method,params,n,dtype", CASES)
def test_the_device_path_gives_the_cpu_paths_bytes(method, params, n, dtype, make_models, monkeypatch):
    paths = make_models(n, dtypes=["F16", "BF16", "F32"][:n])
    plan = lambda: helpers.plan_for(paths, [0.5, 0.3, 0.2][:n], method=method, params=params, dtype=dtype, seed=5)
    chunked, _ = merge_to_state_dict(plan())
    monkeypatch.setattr(runner, "_chunked", lambda device: False)
    whole, _ = merge_to_state_dict(plan())
    assert chunked.keys() == whole.keys()
    differ = [k for k in chunked if not torch.equal(chunked[k].view(torch.uint8) if chunked[k].dtype == torch.float8_e4m3fn else chunked[k],
                                                     whole[k].view(torch.uint8) if whole[k].dtype == torch.float8_e4m3fn else whole[k])]
    assert not differ, f"{len(differ)} keys differ, e.g. {differ[:3]}"
