"""Plans for the three-model difference merges (train difference, add difference), with per-block strength.

``plan_train_difference(a, b, c, alpha=1.0, alpha_blocks=None)`` returns an engine :class:`MergePlan`; run it with
:func:`merger_core.merge.runner.merge_to_file` or :func:`~merger_core.merge.runner.merge_to_state_dict` (or both).
``alpha_blocks`` is a block spec (preset, one value per block, or ``NAME=value`` pairs; see
:mod:`merger_core.merge.blockweights`) for the architecture detected from A's header.
"""

from __future__ import annotations

import os
from typing import Optional

from .plan import MergeInput, MergePlan
from ..errors import ManifestError


def detect_arch(path: str) -> str:
    """Architecture id of ``path`` from its header (``unknown`` if not recognised)."""
    from ..arch import detect

    return detect(path, read_probe=False).arch_id


def plan_difference(
    method: str,
    a: str,
    b: str,
    c: str,
    alpha: float = 1.0,
    alpha_blocks: Optional[object] = None,
    dtype: str = "fp16",
    device: str = "cpu",
    title: Optional[str] = None,
) -> MergePlan:
    if method not in ("train_difference", "add_difference"):
        raise ManifestError(f"{method!r} is not a difference method (train_difference, add_difference)")
    from ..methods import get_method

    m = get_method(method)
    params = m.check_params({"alpha": alpha})
    hook = None
    recipe = {}
    if alpha_blocks is not None and alpha_blocks != "":
        arch = detect_arch(a)
        if arch == "unknown":
            raise ManifestError(
                f"{os.path.basename(a)}: its architecture is not recognised, so per-block alpha has no block map"
            )
        from .blockweights import key_params_hook, parse_blocks

        hook = key_params_hook(arch, {"alpha": alpha_blocks}, m)
        recipe["alpha_blocks"] = parse_blocks(alpha_blocks, arch)
    inputs = [MergeInput(os.fspath(p), 1.0) for p in (a, b, c)]
    replay = {"planner": "difference", "args": {"method": method, "a": 0, "b": 1, "c": 2, "alpha": float(alpha),
                                                  "alpha_blocks": alpha_blocks if alpha_blocks != "" else None,
                                                  "dtype": dtype, "device": device, "title": title}}
    return MergePlan(
        inputs, method=method, params=params, normalize=False, dtype=dtype, device=device, title=title,
        key_params=hook, recipe=recipe, replay=replay,
    )


def plan_train_difference(a: str, b: str, c: str, alpha: float = 1.0, alpha_blocks=None, **kw) -> MergePlan:
    """A + train difference of (B - C): ``A + 1.8*alpha*(B-C)*|B-A|/(|B-A|+|B-C|)``."""
    return plan_difference("train_difference", a, b, c, alpha, alpha_blocks, **kw)
