"""What is in a LoRA file, from its header alone: modules, their format, the architecture they are for.

A LoRA file is a safetensors file of small tensors named ``<module>.<part>``. The parts say the format:

* kohya LoRA / LoCon: ``lora_up.weight``, ``lora_down.weight``, ``alpha``, LoCon Tucker ``lora_mid.weight``
* diffusers / PEFT: ``lora_B.weight`` / ``lora_A.weight``; older diffusers ``lora.up.weight`` / ``lora.down.weight``,
  ``_lora.up.weight`` / ``_lora.down.weight``, ``lora_linear_layer.up.weight`` / ``.down.weight``
* LyCORIS LoHa: ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, CP ``hada_t1``, ``hada_t2``
* LyCORIS LoKr: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``, CP ``lokr_t2``
* full differences: ``diff`` (and ``diff_b`` for the bias)

Tensors whose part is none of these are reported by name (never dropped silently). ``dora_scale`` (DoRA) and the
OFT/BOFT/GLoRA parts are recognised and refused by name, since their result depends on the whole merged weight.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..errors import ModelMergerError
from ..io.safetensors import SafetensorsHeader, TensorInfo, read_header


class LoraError(ModelMergerError):
    """A LoRA file cannot be used as asked (a kind of module that is not supported, a bad rank, a bad setting)."""


# part -> (format, role). Longest parts are tried first, so '_lora.up.weight' wins over '.weight'-less names.
PARTS: Dict[str, Tuple[str, str]] = {
    ".lora_up.weight": ("lora", "up"), ".lora_down.weight": ("lora", "down"), ".lora_mid.weight": ("lora", "mid"),
    ".lora_B.weight": ("peft", "up"), ".lora_A.weight": ("peft", "down"),
    ".lora_B.default.weight": ("peft", "up"), ".lora_A.default.weight": ("peft", "down"),
    ".lora.up.weight": ("diffusers", "up"), ".lora.down.weight": ("diffusers", "down"),
    "_lora.up.weight": ("diffusers", "up"), "_lora.down.weight": ("diffusers", "down"),
    ".lora_linear_layer.up.weight": ("diffusers", "up"), ".lora_linear_layer.down.weight": ("diffusers", "down"),
    ".hada_w1_a": ("loha", "w1_a"), ".hada_w1_b": ("loha", "w1_b"), ".hada_w2_a": ("loha", "w2_a"),
    ".hada_w2_b": ("loha", "w2_b"), ".hada_t1": ("loha", "t1"), ".hada_t2": ("loha", "t2"),
    ".lokr_w1": ("lokr", "w1"), ".lokr_w2": ("lokr", "w2"), ".lokr_w1_a": ("lokr", "w1_a"),
    ".lokr_w1_b": ("lokr", "w1_b"), ".lokr_w2_a": ("lokr", "w2_a"), ".lokr_w2_b": ("lokr", "w2_b"),
    ".lokr_t2": ("lokr", "t2"),
    ".diff": ("diff", "diff"), ".diff_b": ("diff", "diff_b"),
    ".alpha": ("", "alpha"), ".dora_scale": ("", "dora_scale"),
    # recognised, not supported (refused by name when they would be applied)
    ".oft_blocks": ("oft", "oft_blocks"), ".oft_diag": ("boft", "oft_diag"), ".rescale": ("oft", "rescale"),
    ".a1.weight": ("glora", "a1"), ".a2.weight": ("glora", "a2"), ".b1.weight": ("glora", "b1"),
    ".b2.weight": ("glora", "b2"), ".w_norm": ("norm", "w_norm"), ".b_norm": ("norm", "b_norm"),
    ".set_weight": ("set", "set_weight"), ".reshape_weight": ("", "reshape_weight"),
}
_PARTS_LONGEST = sorted(PARTS, key=len, reverse=True)
SUPPORTED = {"lora", "peft", "diffusers", "loha", "lokr", "diff"}
KIND_LABELS = {"lora": "kohya LoRA", "locon": "kohya LoCon (conv)", "locon_tucker": "LoCon Tucker (lora_mid)",
               "peft": "diffusers/PEFT", "diffusers": "diffusers (old)", "loha": "LyCORIS LoHa",
               "lokr": "LyCORIS LoKr", "diff": "full difference"}


@dataclass
class LoraModule:
    """One module of a LoRA file: its name, its format and the tensor names of its parts (role -> name)."""

    name: str
    format: str  # lora, peft, diffusers, loha, lokr, diff, or an unsupported one (oft, boft, glora, norm, set)
    parts: Dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The formula it needs: lora (also peft/diffusers), locon, locon_tucker, loha, lokr, diff."""
        if self.format in ("lora", "peft", "diffusers"):
            return "locon_tucker" if "mid" in self.parts else "lora"
        return self.format

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.parts


@dataclass
class LoraFile:
    """A LoRA file's header, read once: its modules, tensors that belong to none, and what it is for."""

    path: str
    header: SafetensorsHeader
    modules: Dict[str, LoraModule]
    unknown: List[str]  # tensor names whose part is no known one
    arch: Optional[str] = None  # sd1, sd2, sdxl, sd3, flux, or None when the names do not say

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def info(self, tensor: str) -> TensorInfo:
        return self.header.tensors[tensor]

    def formats(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for m in self.modules.values():
            label = KIND_LABELS.get(m.kind, m.format)
            if m.kind == "lora" and m.format == "lora" and len(self.info(m.parts.get("down", "")).shape if "down" in m.parts else ()) == 4:
                label = KIND_LABELS["locon"]
            out[label] = out.get(label, 0) + 1
        return dict(sorted(out.items()))


def split_name(tensor: str) -> Tuple[Optional[str], Optional[str], Optional[str]]:
    """tensor name -> (module, format, role), or (None, None, None) when its part is no known one."""
    for part in _PARTS_LONGEST:
        if tensor.endswith(part) and len(tensor) > len(part):
            fmt, role = PARTS[part]
            return tensor[: -len(part)], fmt, role
    return None, None, None


def read_lora(path) -> LoraFile:
    """Read a LoRA file's header (``io.safetensors.read_header`` refuses bad files) and group its tensors."""
    header = read_header(path)
    groups: Dict[str, Dict[str, str]] = {}
    fmts: Dict[str, set] = {}
    unknown: List[str] = []
    for t in sorted(header.tensors):
        module, fmt, role = split_name(t)
        if module is None:
            unknown.append(t)
            continue
        groups.setdefault(module, {})[role] = t
        if fmt:
            fmts.setdefault(module, set()).add(fmt)
    modules: Dict[str, LoraModule] = {}
    for module, parts in groups.items():
        found = fmts.get(module, set())
        if not found:  # only alpha / dora_scale: a part without a module
            unknown.extend(parts.values())
            continue
        fmt = sorted(found - {"diff"})[0] if len(found) > 1 and found - {"diff"} else sorted(found)[0]
        if len(found - {"diff"}) > 1:
            raise LoraError(f"{os.path.basename(header.path)}: module {module!r} mixes formats {sorted(found)}")
        modules[module] = LoraModule(module, fmt, parts)
    lf = LoraFile(os.fspath(path), header, modules, unknown)
    _check_parts(lf)
    lf.arch = detect_lora_arch(lf)
    return lf


_NEEDS = {"lora": [("up", "down")], "peft": [("up", "down")], "diffusers": [("up", "down")],
          "loha": [("w1_a", "w1_b", "w2_a", "w2_b")], "lokr": [("w1",), ("w1_a", "w1_b")],
          "diff": [("diff",), ("diff_b",)]}


def _check_parts(lf: LoraFile) -> None:
    for m in lf.modules.values():
        if m.format not in _NEEDS:
            continue
        if not any(all(r in m.parts for r in need) for need in _NEEDS[m.format]):
            raise LoraError(f"{lf.name}: module {m.name!r} ({m.format}) lacks parts: it has {sorted(m.parts)}")
        if m.format == "lokr" and not ("w2" in m.parts or ("w2_a" in m.parts and "w2_b" in m.parts)):
            raise LoraError(f"{lf.name}: LoKr module {m.name!r} has no lokr_w2 (or lokr_w2_a/b)")


# ---- which architecture a LoRA is for, from names and shapes ------------------------------------------------------
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # in-features of the UNet's cross-attention to_k
TE_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
_TO_K2 = re.compile(r"attn2[._]to_k$")
_TE_FC1 = re.compile(r"(lora_te\d?_|text_encoder(_2)?\.|text_encoders\.).*mlp[._]fc1$")


def _in_features(lf: LoraFile, m: LoraModule) -> Optional[int]:
    role = {"lora": "down", "peft": "down", "diffusers": "down", "loha": "w1_b", "diff": "diff"}.get(m.format)
    if role is None or role not in m.parts:
        return None
    shape = lf.info(m.parts[role]).shape
    return shape[1] if len(shape) >= 2 else None


def detect_lora_arch(lf: LoraFile) -> Optional[str]:
    """sd1, sd2, sdxl, sd3 or flux, from module names and factor shapes (no weight is read); None if unsure."""
    names = list(lf.modules)
    joined = "\n".join(names)
    if re.search(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]", joined, re.M):
        return "flux"
    if re.search(r"(^|[._])joint_blocks[._]", joined, re.M) or (
            re.search(r"transformer_blocks[._]\d+[._]attn[._]add_q_proj", joined) and "down_blocks" not in joined):
        return "sd3"
    for m in lf.modules.values():
        if _TO_K2.search(m.name):
            dim = _in_features(lf, m)
            if dim in CONTEXT_DIMS:
                return CONTEXT_DIMS[dim]
    widths = {TE_WIDTHS.get(_in_features(lf, m)) for m in lf.modules.values() if _TE_FC1.search(m.name)}
    if "clip_g" in widths or re.search(r"^(lora_te2_|text_encoder_2\.)", joined, re.M):
        return "sdxl"
    if "clip_h" in widths:
        return "sd2"
    if "clip_l" in widths:
        return "sd1"
    return None


# the LoRA architecture each key map is for
KEYMAP_ARCH = {"sd15": "sd1", "sd21": "sd2", "sdxl_base": "sdxl", "sd3_medium": "sd3", "flux1_dev": "flux"}


def module_shape(lf: LoraFile, m: LoraModule) -> Optional[Tuple[int, ...]]:
    """The delta's shape as the factors say (numel is what must match the target), or None if they do not say."""
    s = lambda role: lf.info(m.parts[role]).shape  # noqa: E731
    if m.format in ("lora", "peft", "diffusers"):
        up, down = s("up"), s("down")
        if "mid" in m.parts:
            mid = s("mid")
            return (up[0], down[1], *mid[2:])
        return (up[0], down[1], *down[2:])
    if m.format == "loha":
        a, b = s("w1_a"), s("w1_b")
        if "t1" in m.parts:
            t = s("t1")
            return (a[1], b[1], *t[2:])
        return (a[0], *b[1:])
    if m.format == "lokr":
        w1 = s("w1") if "w1" in m.parts else (s("w1_a")[0], s("w1_b")[1])
        if "w2" in m.parts:
            w2 = s("w2")
        elif "t2" in m.parts:
            w2 = (s("w2_a")[1], s("w2_b")[1], *s("t2")[2:])
        else:
            w2 = (s("w2_a")[0], s("w2_b")[1])
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    if m.format == "diff":
        return s("diff") if "diff" in m.parts else None
    return None


def numel(shape) -> int:
    return math.prod(shape) if shape else 1
