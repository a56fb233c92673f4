"""Baking LoRAs: per checkpoint key, the sum over LoRAs of strength * scale * delta, added to a slice of the merged
fp32 values in place, on their device.

The formulas are ComfyUI's (``comfy/weight_adapter/lora.py``, ``loha.py``, ``lokr.py``), in fp32:

* LoRA / LoCon / PEFT: ``up.flatten(1) @ down.flatten(1)``, scale ``alpha / rank`` (rank = down's rows; 1 without
  alpha); LoCon Tucker (``lora_mid``): down becomes ``(down^T.flatten(1) @ mid^T.flatten(1))`` reshaped to
  ``(in, rank, kh, kw)`` and transposed back, as ComfyUI does.
* LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (CP: ``einsum('ijkl,jr,ip->prkl', t, w_b, w_a)``), scale ``alpha / rank1``.
* LoKr: ``kron(w1, w2)`` with each factor whole or ``a @ b`` (w2 also CP), scale ``alpha / dim`` where dim is
  w2_b's rows if w2 is factored, else w1_b's rows if w1 is, else the scale is 1.
* diff: the tensor itself.

The runner calls ``add_to(values, start)`` from several workers at once on different slices of one key. A slice of
an ``(out, ...)`` key covers rows ``r0 .. r1``; only those rows of the delta are computed (``up[r0:r1] @ down``), so
no full delta is ever held, except for the rare shapes where rows do not line up (a transposed ``text_projection``,
a LoKr whose factors do not split by rows), which are computed once under a lock. The factors of the current key are
read lazily, once (under a lock), in fp32 on the values' device: what baking adds to memory is the LoRA factors of
the current key plus the slice.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from ..errors import BadFileError, IncompatibleModelsError
from .formats import KEYMAP_ARCH, LoraError, LoraFile, LoraModule, module_shape, numel, read_lora
from .keymap import Target, arch_of_checkpoint, build_key_map

# LoRA labels of the architectures, for messages
ARCH_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}


ROW_BLOCK = 64  # delta rows are computed in blocks of this many rows, aligned to the key


def _row_len(shape: Sequence[int]) -> int:
    return numel(shape[1:]) if len(shape) >= 1 else 1


def _lokr_factors(f):
    """LoKr's two Kronecker factors, each whole or ``a @ b`` (w2 also CP), w1 widened to 4-D beside a conv w2."""
    import torch

    w1 = f["w1"] if "w1" in f else torch.mm(f["w1_a"], f["w1_b"])
    if "w2" in f:
        w2 = f["w2"]
    elif "t2" in f:
        w2 = torch.einsum("i j k l, j r, i p -> p r k l", f["t2"], f["w2_b"], f["w2_a"])
    else:
        w2 = torch.mm(f["w2_a"], f["w2_b"])
    if w2.ndim == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return w1, w2


class ModuleDelta:
    """The delta of one LoRA module (without strength), as rows, from factors read on first use."""

    def __init__(self, lora: LoraFile, module: LoraModule, role: str = "weight"):
        self.lora = lora
        self.module = module
        self.role = role  # weight, or diff_b (a full bias difference)
        self.shape = tuple(module_shape(lora, module) or ()) if role == "weight" else \
            tuple(lora.info(module.parts["diff_b"]).shape)

    # -- reading --------------------------------------------------------------------------------------------------
    def load(self, device) -> Dict[str, object]:
        import torch
        from safetensors import safe_open

        out: Dict[str, object] = {}
        try:
            with safe_open(self.lora.path, framework="pt", device="cpu") as f:
                for role, name in self.module.parts.items():
                    if role in ("alpha", "reshape_weight"):
                        out[role] = float(f.get_tensor(name).float().reshape(-1)[0].item()) if role == "alpha" else None
                    elif role != "dora_scale" and (self.role == "weight") == (role != "diff_b"):
                        out[role] = f.get_tensor(name).to(device=device, dtype=torch.float32)
        except Exception as exc:  # safetensors raises its own error types
            raise BadFileError(f"{self.lora.name}: cannot read module {self.module.name!r} ({exc})") from exc
        return out

    # -- the formulas ---------------------------------------------------------------------------------------------
    def scale(self, f) -> float:
        alpha = f.get("alpha")
        fmt = self.module.format
        if alpha is None or fmt == "diff":
            return 1.0
        if fmt in ("lora", "peft", "diffusers"):
            return alpha / f["down"].shape[0]
        if fmt == "loha":
            return alpha / f["w1_b"].shape[0]
        if fmt == "lokr":
            dim = None
            if "w1" not in f:
                dim = f["w1_b"].shape[0]
            if "w2" not in f:
                dim = f["w2_b"].shape[0]
            return alpha / dim if dim is not None else 1.0
        return 1.0

    def rows(self, f, r0: int, r1: int):
        """Rows r0..r1 of the unscaled delta, flattened to (r1 - r0, row length), fp32; None if rows do not split."""
        import torch

        fmt = self.module.format
        if self.role == "diff_b":
            return f["diff_b"].reshape(self.shape[0], -1)[r0:r1]
        if fmt == "diff":
            return f["diff"].reshape(self.shape[0], -1)[r0:r1]
        if fmt in ("lora", "peft", "diffusers"):
            up, down = f["up"], f["down"]
            if "mid" in f:
                mid = f["mid"]
                final = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
                down = torch.mm(down.transpose(0, 1).flatten(start_dim=1),
                                mid.transpose(0, 1).flatten(start_dim=1)).reshape(final).transpose(0, 1)
            return torch.mm(up.flatten(start_dim=1)[r0:r1], down.flatten(start_dim=1))
        if fmt == "loha":
            def half(a, b, t):
                if t is None:
                    return torch.mm(a[r0:r1], b)
                return torch.einsum("i j k l, j r, i p -> p r k l", t, b, a[:, r0:r1]).flatten(start_dim=1)
            return half(f["w1_a"], f["w1_b"], f.get("t1")) * half(f["w2_a"], f["w2_b"], f.get("t2"))
        if fmt == "lokr":
            w1, w2 = _lokr_factors(f)
            c = w2.shape[0]
            if w1.shape[0] * c != self.shape[0]:
                return None
            i0, i1 = r0 // c, -(-r1 // c)
            block = torch.kron(w1[i0:i1], w2).reshape((i1 - i0) * c, -1)
            return block[r0 - i0 * c: r1 - i0 * c]
        raise LoraError(f"{self.lora.name}: module {self.module.name!r}: {fmt} is not supported")

    def full(self, f):
        """The whole unscaled delta in its own shape (for the shapes whose rows do not line up)."""
        import torch

        if self.module.format == "lokr":
            return torch.kron(*_lokr_factors(f))
        n = self.shape[0] if self.shape else 1
        return self.rows(f, 0, n)


@dataclass
class Contribution:
    module: ModuleDelta
    target: Target
    strength: float


class KeyDelta:
    """What the LoRAs add to one checkpoint key: ``add_to(values, start)`` (thread-safe; see the module doc)."""

    def __init__(self, key: str, shape: Tuple[int, ...], contributions: List[Contribution]):
        self.key = key
        self.shape = tuple(shape)
        self.contributions = contributions
        self._lock = threading.Lock()
        self._factors: Dict[Tuple[int, str], Dict[str, object]] = {}
        self._whole: Dict[Tuple[int, str], object] = {}

    def _get(self, i: int, device):
        k = (i, str(device))
        with self._lock:
            f = self._factors.get(k)
            if f is None:
                f = self._factors[k] = self.contributions[i].module.load(device)
            return f

    def _whole_rows(self, i: int, f, device):
        """The contribution's delta in the key's layout, flattened to (rows, row length), computed once."""
        k = (i, str(device))
        with self._lock:
            w = self._whole.get(k)
            if w is None:
                c = self.contributions[i]
                full = c.module.full(f)
                rows = c.target.rows[1] if c.target.rows else (self.shape[0] if self.shape else 1)
                if c.target.transpose:
                    full = full.reshape(full.shape[0], -1).transpose(0, 1).contiguous()
                w = self._whole[k] = full.reshape(rows, -1)
            return w

    def add_to(self, values, start: int) -> None:
        n = values.numel()
        end = start + n
        rl = _row_len(self.shape)
        for i, c in enumerate(self.contributions):
            row0, count = c.target.rows if c.target.rows else (0, self.shape[0] if self.shape else 1)
            m0, m1 = row0 * rl, (row0 + count) * rl
            lo, hi = max(start, m0), min(end, m1)
            if lo >= hi or c.strength == 0.0:
                continue
            f = self._get(i, values.device)
            alpha = c.strength * c.module.scale(f)
            r0, r1 = (lo - m0) // rl, -(-(hi - m0) // rl)
            # rows in fixed blocks of ROW_BLOCK, so that the bytes never depend on where the slices are cut
            b = (r0 // ROW_BLOCK) * ROW_BLOCK
            while b < r1:
                b1 = min(b + ROW_BLOCK, count)
                block = None if c.target.transpose else c.module.rows(f, b, b1)
                if block is None:
                    block = self._whole_rows(i, f, values.device)[b:b1]
                e0, e1 = max(lo, m0 + b * rl), min(hi, m0 + b1 * rl)
                at = e0 - m0 - b * rl
                values[e0 - start: e1 - start].add_(block.reshape(-1)[at: at + (e1 - e0)], alpha=alpha)
                b = b1

    def release(self) -> None:
        with self._lock:
            self._factors.clear()
            self._whole.clear()


@dataclass
class LoraReport:
    """What baking these LoRAs does: per LoRA its modules, formats, the ones that match no key (shown to the user),
    the tensors of no known kind; and per checkpoint key the LoRAs that patch it."""

    loras: List[Dict[str, object]] = field(default_factory=list)
    keys: Dict[str, List[str]] = field(default_factory=dict)  # checkpoint key -> LoRA file names

    @property
    def unmatched(self) -> Dict[str, List[str]]:
        return {l["name"]: l["unmatched"] for l in self.loras if l["unmatched"]}

    def lines(self) -> List[str]:
        out = []
        for l in self.loras:
            fm = ", ".join(f"{n} {k}" for k, n in l["formats"].items())
            out.append(f"{l['name']}: {l['arch_label']}, {l['matched']} of {l['modules']} modules matched ({fm}), "
                       f"strength {l['strength_model']:g} model / {l['strength_clip']:g} text encoders")
            if l["unmatched"]:
                shown = ", ".join(l["unmatched"][:8]) + (f" and {len(l['unmatched']) - 8} more" if len(l["unmatched"]) > 8 else "")
                out.append(f"  {len(l['unmatched'])} module(s) match no checkpoint key and are not applied: {shown}")
            if l["unknown"]:
                out.append(f"  {len(l['unknown'])} tensor(s) of no known LoRA kind, not applied: " + ", ".join(l["unknown"][:8]))
        return out


def _is_unet(key: str) -> bool:
    return key.startswith("model.diffusion_model.") or not key.startswith(
        ("cond_stage_model.", "conditioner.", "text_encoders.", "first_stage_model."))


def _shapes(checkpoint_keys_and_shapes) -> Dict[str, Tuple[int, ...]]:
    items = checkpoint_keys_and_shapes.items() if isinstance(checkpoint_keys_and_shapes, Mapping) else checkpoint_keys_and_shapes
    out = {}
    for k, v in items:
        out[k] = tuple(getattr(v, "shape", v))
    return out


def plan_lora(shapes: Mapping[str, Tuple[int, ...]], lf: LoraFile, arch: str, keymap: Mapping[str, Target],
              strength_model: float, strength_clip: float):
    """(contributions per key, report entry) for one LoRA; refuses another architecture and DoRA, by name."""
    want = KEYMAP_ARCH.get(arch)
    if lf.arch is not None and want is not None and lf.arch != want:
        raise IncompatibleModelsError(
            f"{lf.name} is a {ARCH_LABELS.get(lf.arch, lf.arch)} LoRA and the checkpoint is "
            f"{ARCH_LABELS.get(want, want)}: a LoRA applies only to the architecture it was trained for")
    per_key: Dict[str, List[Contribution]] = {}
    unmatched, bad_shape, refused = [], [], []
    matched = 0
    for name, m in sorted(lf.modules.items()):
        t = keymap.get(name)
        if t is None:
            unmatched.append(name)
            continue
        if m.format not in ("lora", "peft", "diffusers", "loha", "lokr", "diff"):
            refused.append(f"{name} ({m.format})")
            continue
        if m.dora:
            refused.append(f"{name} (DoRA dora_scale)")
            continue
        strength = strength_model if _is_unet(t.key) else strength_clip
        roles = ["weight"] if m.format != "diff" or "diff" in m.parts else []
        if m.format == "diff" and "diff_b" in m.parts:
            roles.append("diff_b")
        for role in roles:
            md = ModuleDelta(lf, m, role)
            tgt = t
            if role == "diff_b":
                bias = t.key[: -len(".weight")] + ".bias" if t.key.endswith(".weight") else None
                if bias not in shapes:
                    unmatched.append(name + ".diff_b")
                    continue
                tgt = Target(bias, t.rows)
            shape = shapes[tgt.key]
            want_n = (tgt.rows[1] * _row_len(shape)) if tgt.rows else numel(shape)
            if numel(md.shape) != want_n:
                bad_shape.append(f"{name}: {tuple(md.shape)} vs {tgt.key} {tuple(shape)}"
                                 + (f" rows {tgt.rows[0]}..{tgt.rows[0] + tgt.rows[1]}" if tgt.rows else ""))
                continue
            per_key.setdefault(tgt.key, []).append(Contribution(md, tgt, strength))
        matched += 1
    if refused:
        raise LoraError(
            f"{lf.name}: {len(refused)} module(s) of a kind that cannot be baked here: {', '.join(refused[:6])}"
            + (" ..." if len(refused) > 6 else "") + " (DoRA, OFT, BOFT, GLoRA and set/norm patches need the whole "
            "merged weight; bake them in ComfyUI, or use a LoRA without them)")
    if bad_shape:
        raise IncompatibleModelsError(
            f"{lf.name}: {len(bad_shape)} module(s) do not fit the checkpoint's shapes (a LoRA for another model?): "
            + "; ".join(bad_shape[:5]))
    if lf.modules and matched == 0:
        raise IncompatibleModelsError(
            f"{lf.name}: none of its {len(lf.modules)} modules matches a key of this {ARCH_LABELS.get(want, arch)} "
            f"checkpoint (e.g. {next(iter(sorted(lf.modules)))}): it is for another architecture or another key naming")
    entry = {"name": lf.name, "path": lf.path, "arch": lf.arch, "arch_label": ARCH_LABELS.get(lf.arch or want, "?"),
             "modules": len(lf.modules), "matched": matched, "formats": lf.formats(), "unmatched": unmatched,
             "unknown": list(lf.unknown), "strength_model": strength_model, "strength_clip": strength_clip}
    return per_key, entry


def lora_deltas(checkpoint_keys_and_shapes, loras: Iterable[Tuple[str, float, float]], arch: Optional[str] = None
                ) -> Tuple[Callable[[str], Optional[KeyDelta]], LoraReport]:
    """Plan baking ``loras`` = [(path, strength_model, strength_clip)] into a checkpoint with these keys and shapes
    (a mapping key -> shape or TensorInfo, or (key, shape) pairs). Reads headers only; refuses bad files, LoRAs of
    another architecture and modules that cannot be baked before any weight is read.

    Returns ``(key_delta, report)``: ``key_delta(key)`` gives a fresh :class:`KeyDelta` for a key some LoRA patches
    (``None`` otherwise), to hand to ``MergePlan.key_delta``; ``report`` is a :class:`LoraReport`.
    """
    shapes = _shapes(checkpoint_keys_and_shapes)
    arch = arch or arch_of_checkpoint(shapes)
    if arch is None:
        raise IncompatibleModelsError(
            "LoRAs can be baked into SD1.x, SD2.x, SDXL, SD3 and Flux checkpoints in the saved layout; this checkpoint "
            "is none of those (no LoRA key map fits its keys)")
    keymap = build_key_map(arch, shapes)
    per_key: Dict[str, List[Contribution]] = {}
    report = LoraReport()
    loras = list(loras)
    files = [read_lora(p) for p, _, _ in loras]  # every header first: a bad file is refused before the others work
    for lf, (path, sm, sc) in zip(files, loras):
        got, entry = plan_lora(shapes, lf, arch, keymap, float(sm), float(sc))
        for k, cs in got.items():
            per_key.setdefault(k, []).extend(cs)
            report.keys.setdefault(k, []).append(lf.name)
        report.loras.append(entry)

    def key_delta(key: str) -> Optional[KeyDelta]:
        cs = per_key.get(key)
        if not cs:
            return None
        return KeyDelta(key, shapes[key], cs)

    return key_delta, report
