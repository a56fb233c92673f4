"""Architecture detection from a safetensors header (no weight reads, except one small tensor for SD2).

``detect(path)`` returns a :class:`Detection`: architecture id, family, variant, prediction type, components
present or missing, dtypes, parameter counts, expected versus actual size, metadata claims and every
disagreement, and the evidence for each conclusion. A layout that matches no fingerprint completely is reported as
``"unknown"`` with the closest match and what differs, never as a guess.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

from ..io.safetensors import MARKER_KEYS, SafetensorsHeader, dtype_label, read_header
from ..data import load_json
from .fingerprints import UNET_PREFIX, Fingerprint, load_fingerprints, load_layouts
from . import keymap as _keymap

STANDARD_PREFIXES = (UNET_PREFIX, "")

# Quantized checkpoints, named by their key layout (headers only).
# * ComfyUI's scaled fp8: a marker tensor ``scaled_fp8`` (under the component's prefix) and, per quantized Linear
#   layer, fp8 codes in ``X.weight`` with an fp32 ``X.scale_weight`` (the value is ``codes.float() * scale``) and
#   sometimes an ``X.scale_input`` (used only by fp8 matrix multiplication). Merged after dequantizing.
# * bitsandbytes 4-bit (NF4, FP4): ``X.weight`` holds packed uint8 codes beside ``X.weight.absmax``,
#   ``.quant_map``, ``.nested_absmax``, ``.nested_quant_map`` and ``X.weight.quant_state.bitsandbytes__nf4``
#   (or ``__fp4``). Refused: the codes are block-wise and cannot be merged key by key.
QUANTIZATION_NAMES = {
    "scaled_fp8": "ComfyUI scaled fp8",
    "nf4": "bitsandbytes NF4",
    "fp4": "bitsandbytes FP4",
    "bnb_4bit": "bitsandbytes 4-bit",
}
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT = "scale_weight"
SCALE_INPUT = "scale_input"
BNB_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
BNB_QUANT_STATE = ".quant_state.bitsandbytes__"
REFUSED_QUANTIZATIONS = ("nf4", "fp4", "bnb_4bit")


def _last_name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def quantization(tensors) -> Optional[str]:
    """The quantized format of a header's tensors (``{name: TensorInfo}``): ``"scaled_fp8"``, ``"nf4"``,
    ``"fp4"``, ``"bnb_4bit"`` (bitsandbytes 4-bit of an unnamed type) or None for a plain checkpoint."""
    bnb = None
    scaled = False
    for k in tensors:
        if BNB_QUANT_STATE in k:
            kind = k.rsplit(BNB_QUANT_STATE, 1)[1]
            bnb = kind if kind in ("nf4", "fp4") else (bnb or "bnb_4bit")
        elif k.endswith(BNB_SUFFIXES):
            bnb = bnb or "bnb_4bit"
        elif _last_name(k) in (SCALED_FP8_MARKER, SCALE_WEIGHT):
            scaled = True
    if bnb is not None:
        return bnb
    return "scaled_fp8" if scaled else None


def scaled_fp8_keys(tensors) -> Tuple[Dict[str, str], List[str]]:
    """For a scaled fp8 checkpoint: ``{weight key: its scale_weight key}``, and the keys that are not weights (the
    scales, the input scales and the ``scaled_fp8`` markers), which a dequantized output does not have."""
    scales: Dict[str, str] = {}
    hidden: List[str] = []
    for k in tensors:
        last = _last_name(k)
        if last in (SCALED_FP8_MARKER, SCALE_WEIGHT, SCALE_INPUT):
            hidden.append(k)
            if last == SCALE_WEIGHT:
                weight = k[: -len(SCALE_WEIGHT)] + "weight"
                if weight in tensors:
                    scales[weight] = k
    return scales, sorted(hidden)


def merge_view(header: SafetensorsHeader) -> SafetensorsHeader:
    """The header as a merge sees it: a scaled fp8 checkpoint without its scale and marker keys (its weights are
    merged as their values, and the output has no scales); any other header as it is."""
    if quantization(header.tensors) != "scaled_fp8":
        return header
    _, hidden = scaled_fp8_keys(header.tensors)
    drop = set(hidden)
    return dataclasses.replace(header, tensors={k: t for k, t in header.tensors.items() if k not in drop})


def quantization_refusal(kind: str) -> str:
    """Why a checkpoint in a refused quantized format cannot be merged, and what to do instead."""
    name = QUANTIZATION_NAMES.get(kind, kind)
    return (
        f"{name}-quantized: its weights are packed 4-bit codes with per-block scales, which cannot be merged key by "
        "key; merge the unquantized model (fp16, bf16 or fp32) instead, or dequantize this one first with "
        "bitsandbytes (bitsandbytes.functional.dequantize_4bit) and save it as safetensors"
    )


@dataclass
class ComponentInfo:
    name: str
    status: str  # present | partial | missing | extra
    tensors: int = 0
    params: int = 0
    bytes: int = 0
    expected_tensors: Optional[int] = None
    expected_params: Optional[int] = None
    dtypes: Dict[str, int] = field(default_factory=dict)  # dtype label -> bytes
    required: bool = True

    @property
    def dtype_label(self) -> str:
        return _dtype_label(self.dtypes)


@dataclass
class Detection:
    path: str
    file_name: str
    file_size: int
    tensors: int
    arch_id: str = "unknown"
    arch_name: str = "unknown"
    family: str = "unknown"
    kind: str = "unknown"
    variant: str = "normal"
    prediction: str = "unknown"
    prediction_source: str = ""
    layout: str = "checkpoint"  # checkpoint | unet_only | renamed_prefix | <name-recognised layout id>
    layout_name: str = ""
    unet_prefix: Optional[str] = None
    score: float = 0.0  # fraction of the signature that matched the chosen/closest fingerprint
    key_layout: List[str] = field(default_factory=list)  # unknown files: architectures whose key names all match
    verified_fingerprint: bool = False
    closest: Optional[str] = None
    closest_score: float = 0.0
    components: Dict[str, ComponentInfo] = field(default_factory=dict)
    dtypes: Dict[str, int] = field(default_factory=dict)  # label -> bytes
    dtype_label: str = ""
    params: int = 0
    expected_params: Optional[int] = None
    data_bytes: int = 0
    expected_data_bytes: Optional[int] = None
    markers: List[str] = field(default_factory=list)
    extra_keys: Dict[str, int] = field(default_factory=dict)  # category -> count
    metadata_claims: Dict[str, str] = field(default_factory=dict)  # source -> claimed value
    claimed_family: Optional[str] = None
    claimed_prediction: Optional[str] = None
    disagreements: List[str] = field(default_factory=list)
    evidence: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    mergeable: bool = False
    refusal: str = ""
    quantization: Optional[str] = None  # scaled_fp8 | nf4 | fp4 | bnb_4bit (QUANTIZATION_NAMES), None: not quantized
    # the key names' layout from the keymaps (arch/keymap.py): checkpoint | unet_only | bare | diffusers_unet | ...
    keymap_layout: str = ""
    keymap_layout_name: str = ""

    @property
    def known(self) -> bool:
        return self.arch_id != "unknown"

    def to_dict(self) -> dict:
        d = asdict(self)
        for name, c in self.components.items():
            d["components"][name]["dtype_label"] = c.dtype_label
        return d


def _dtype_label(by_dtype: Dict[str, int]) -> str:
    floats = {k: v for k, v in by_dtype.items() if v > 0 and k not in ("i64", "i32", "u8", "bool", "other")}
    if not floats:
        return "-" if not by_dtype else "/".join(sorted(by_dtype))
    if len(floats) == 1:
        return next(iter(floats))
    total = sum(floats.values())
    parts = sorted(floats.items(), key=lambda kv: -kv[1])
    return "mixed (" + ", ".join(f"{k} {v / total:.0%}" for k, v in parts) + ")"


# ---------------------------------------------------------------------------------------------------------------
# structural matching


@dataclass
class _Match:
    fp: Fingerprint
    prefix: str
    matched: int
    total: int
    wrong_shape: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]
    missing: List[str]
    count_problems: List[str]
    absent_present: List[str]

    @property
    def score(self) -> float:
        return self.matched / self.total if self.total else 0.0

    @property
    def full(self) -> bool:
        return self.matched == self.total and not self.count_problems and not self.absent_present

    def rank(self):
        penalty = len(self.count_problems) + len(self.absent_present)
        return (self.full, self.score - 0.05 * penalty, self.prefix in STANDARD_PREFIXES, self.total)


def _suffix_index(keys) -> Dict[str, set]:
    """suffix after a '.' boundary (or the whole key) -> prefixes that precede it."""
    idx: Dict[str, set] = defaultdict(set)
    for k in keys:
        idx[k].add("")
        pos = k.find(".")
        while pos >= 0:
            idx[k[pos + 1:]].add(k[: pos + 1])
            pos = k.find(".", pos + 1)
    return idx


def _block_counts(tensors, prefix: str) -> Dict[str, int]:
    """'input_blocks.' -> number of distinct numeric indices after it, for keys under ``prefix``."""
    seen: Dict[str, set] = defaultdict(set)
    n = len(prefix)
    for k in tensors:
        if k.startswith(prefix):
            parts = k[n:].split(".", 2)
            if len(parts) > 1 and parts[1].isdigit():
                seen[parts[0] + "."].add(parts[1])
    return {b: len(v) for b, v in seen.items()}


def _match(fp: Fingerprint, tensors, prefix: str, counts_cache: Dict[str, Dict[str, int]]) -> _Match:
    vkey = fp.variant.get("key")
    vdim = fp.variant.get("dim")
    matched = 0
    wrong, missing = [], []
    for rel, shape in fp.signature.items():
        t = tensors.get(prefix + rel)
        if t is None:
            missing.append(rel)
            continue
        if rel == vkey and len(t.shape) == len(shape):
            same = all(a == b for i, (a, b) in enumerate(zip(t.shape, shape)) if i != vdim)
        else:
            same = tuple(t.shape) == tuple(shape)
        if same:
            matched += 1
        else:
            wrong.append((rel, tuple(t.shape), tuple(shape)))
    counts = []
    if prefix not in counts_cache:
        counts_cache[prefix] = _block_counts(tensors, prefix)
    for block, n in fp.counts.items():
        got = counts_cache[prefix].get(block, 0)
        if got != n:
            counts.append(f"{block.rstrip('.')}: {got} numbered blocks where {fp.id} has {n}")
    absent = [a for a in fp.absent if prefix + a in tensors]
    return _Match(fp, prefix, matched, len(fp.signature), wrong, missing, counts, absent)


def _structural(tensors) -> Tuple[Optional[_Match], Optional[_Match], List[_Match]]:
    """(full match or None, best partial match or None, every match whose key names are all there).

    The usual prefixes are tried first by direct look-up; only when no fingerprint matches completely under one
    of them are all key suffixes indexed to find a renamed prefix.
    """
    fps = load_fingerprints()
    counts_cache: Dict[str, Dict[str, int]] = {}
    results: List[_Match] = []
    tried = set()
    for fp in fps.values():
        for p in STANDARD_PREFIXES:
            if any(p + rel in tensors for rel in fp.signature):
                results.append(_match(fp, tensors, p, counts_cache))
                tried.add((fp.id, p))
    if not any(m.full for m in results):
        idx = _suffix_index(tensors)
        for fp in fps.values():
            prefixes = set()
            for rel in fp.signature:
                prefixes |= idx.get(rel, set())
            for p in prefixes:
                if (p and not p.endswith(".")) or (fp.id, p) in tried:
                    continue
                results.append(_match(fp, tensors, p, counts_cache))
    if not results:
        return None, None, []
    results.sort(key=lambda m: m.rank(), reverse=True)
    best = results[0]
    names_match = [
        m for m in results
        if m.prefix in STANDARD_PREFIXES and not m.missing and not m.count_problems and not m.absent_present
    ]
    if len(names_match) > 1:  # several architectures share these key names: keep those whose shapes agree most
        agree = {id(m): _axis_agreement(m, tensors) for m in names_match}
        top = max(agree.values())
        names_match = [m for m in names_match if agree[id(m)] == top]
    return (best if best.full else None), best, names_match


def _axis_agreement(m: _Match, tensors) -> int:
    """How many axes of the identifying keys have the fingerprint's size (a shrunk SD1 keeps its 768-wide context)."""
    n = 0
    for rel, shape in m.fp.signature.items():
        t = tensors.get(m.prefix + rel)
        if t is not None and len(t.shape) == len(shape):
            n += sum(1 for a, b in zip(t.shape, shape) if a == b)
    return n


# ---------------------------------------------------------------------------------------------------------------


def detect(path: str | os.PathLike, read_probe: bool = True) -> Detection:
    """Detect the architecture of the safetensors file at ``path`` from its header.

    ``read_probe`` allows reading the one small tensor SD2 needs to tell epsilon from v-prediction.
    Raises :class:`~merger_core.errors.BadFileError` for a file whose header cannot be read.
    """
    header = read_header(path)
    return detect_header(header, read_probe=read_probe)


def name_match_archs(tensors) -> List[str]:
    """The architectures whose key names ``tensors`` have under ``model.diffusion_model.``: the one whose fingerprint
    they match completely (names and shapes), else every one whose identifying key names and block counts are all
    there (a model of non-standard widths)."""
    full, _, names_match = _structural(tensors)
    if full is not None:
        return [full.fp.id] if full.prefix == UNET_PREFIX else []
    return [m.fp.id for m in names_match if m.prefix == UNET_PREFIX]


def canonical_names(header: SafetensorsHeader) -> "_keymap.KeyNames":
    """The key layout of ``header`` and ``{file key: canonical key}`` (:func:`.keymap.canonical_names` with this
    detector's structural matcher). Scaled fp8 scale keys are left out first (:func:`merge_view`)."""
    return _keymap.canonical_names(merge_view(header), name_match_archs)


def detect_header(header: SafetensorsHeader, read_probe: bool = True,
                  key_names: Optional["_keymap.KeyNames"] = None) -> Detection:
    """:func:`detect` for a header already read; ``key_names`` is its :func:`canonical_names` where known."""
    kn = key_names if key_names is not None else canonical_names(header)
    det = _detect_structure(header, read_probe)
    if kn.keymap is not None and kn.renamed and not (det.known and det.unet_prefix in STANDARD_PREFIXES):
        # keys in another naming (diffusers UNet names, ...): the structure is that of the canonical names
        view = _keymap.canonical_view(header, kn)
        det = _detect_structure(view, read_probe)
        det.layout = kn.layout
        det.layout_name = kn.layout_name
        det.evidence.insert(0, f"key names: {kn.layout_name}; read under their ComfyUI checkpoint names")
    if kn.keymap is not None:
        det.keymap_layout, det.keymap_layout_name = kn.layout, kn.layout_name
    if kn.refusal:
        det.mergeable = False
        det.refusal = kn.refusal
        det.evidence.append(kn.refusal)
    _quantization(det, header.tensors)
    return det


def _quantization(det: Detection, tensors) -> None:
    kind = quantization(tensors)
    det.quantization = kind
    if kind is None:
        return
    name = QUANTIZATION_NAMES[kind]
    if kind == "scaled_fp8":
        scales, hidden = scaled_fp8_keys(tensors)
        markers = [k for k in hidden if _last_name(k) == SCALED_FP8_MARKER]
        det.evidence.append(
            f"{len(scales)} fp8 weights with a .scale_weight each"
            + (f" and the marker {', '.join(markers)}" if markers else "")
            + f": {name} (each value is the fp8 code times its layer's scale; a merge dequantizes them first)"
        )
        return
    packed = sum(1 for k in tensors if k.endswith(".absmax"))
    det.evidence.append(f"{packed} weights stored as packed 4-bit codes with .absmax/.quant_map/.quant_state: {name}")
    det.mergeable = False
    det.refusal = quantization_refusal(kind)


def _detect_structure(header: SafetensorsHeader, read_probe: bool) -> Detection:
    tensors = header.tensors
    det = Detection(
        path=header.path,
        file_name=os.path.basename(header.path),
        file_size=header.file_size,
        tensors=len(tensors),
        data_bytes=header.data_bytes,
    )
    lay = load_layouts()
    by_dtype: Counter = Counter()
    params = 0
    for t in tensors.values():
        by_dtype[dtype_label(t.dtype)] += t.nbytes
        if t.is_float:
            params += t.numel
    det.params = params
    det.dtypes = dict(by_dtype)
    det.dtype_label = _dtype_label(det.dtypes)
    det.markers = sorted(k for k in tensors if k in MARKER_KEYS)
    _metadata_claims(det, header, lay)

    if not tensors:
        det.evidence.append("the file holds no tensors")
        det.refusal = "the file holds no tensors"
        return det

    full, best, names_match = _structural(tensors)
    if full is None or full.prefix not in STANDARD_PREFIXES:
        name_layout = _name_layout(tensors, lay)
        if name_layout is not None:
            _fill_name_layout(det, name_layout, tensors)
            _finish_claims(det)
            return det
    if full is None:
        det.arch_id = "unknown"
        det.refusal = "the architecture is not recognised"
        if best is not None and best.matched > 0:
            det.closest = best.fp.id
            det.closest_score = round(best.score, 3)
            det.score = det.closest_score
            det.evidence.append(
                f"closest known architecture: {best.fp.name} ({best.fp.id}), {best.matched} of {best.total} "
                f"identifying keys match under prefix {best.prefix!r}"
            )
            det.evidence.extend(_mismatch_evidence(best))
        else:
            det.evidence.append(f"none of the {len(tensors)} keys is an identifying key of a known architecture")
        families = sorted({m.fp.family for m in names_match})
        if families:
            det.key_layout = sorted({m.fp.id for m in names_match})
            det.arch_name = "/".join(f.upper() for f in families) + " layout, non-standard widths"
            det.evidence.append(
                f"every identifying key name of {', '.join(det.key_layout)} is present, but the tensor shapes are not "
                "those of any released model"
            )
        _finish_claims(det)
        return det

    fp = full.fp
    det.arch_id = fp.id
    det.arch_name = fp.name
    det.family = fp.family
    det.kind = fp.kind
    det.unet_prefix = full.prefix
    det.score = 1.0
    det.verified_fingerprint = fp.verified
    det.evidence.append(
        f"all {full.total} identifying keys of {fp.name} match with their shapes under prefix {full.prefix!r}"
        + ("" if fp.verified else " (this fingerprint is derived, not checked against a released file)")
    )
    for block, n in fp.counts.items():
        det.evidence.append(f"{n} numbered {block.rstrip('.')}")
    _variant(det, fp, full.prefix, tensors)
    _components(det, fp, full.prefix, tensors, lay)
    _prediction(det, fp, full.prefix, header, read_probe)
    if full.prefix == UNET_PREFIX:
        det.layout = "checkpoint" if any(c.status != "missing" for n, c in det.components.items() if n != "unet") else "unet_only"
    elif full.prefix == "":
        det.layout = "unet_only" if not any(c.status != "missing" for n, c in det.components.items() if n != "unet") else "bare_prefix"
        if det.layout == "unet_only":
            det.evidence.append("the diffusion model's keys carry no prefix (a UNet/transformer-only file)")
    else:
        det.layout = "renamed_prefix"
        det.warnings.append(
            f"the diffusion model sits under {full.prefix!r} instead of {UNET_PREFIX!r}: it merges only with files "
            "that use the same key names"
        )
    det.layout_name = {
        "checkpoint": "full checkpoint",
        "unet_only": "diffusion model only",
        "bare_prefix": "diffusion model without prefix, plus other components",
        "renamed_prefix": "non-standard key prefix",
    }[det.layout]
    det.mergeable = True
    _finish_claims(det)
    return det


def _mismatch_evidence(m: _Match, limit: int = 6) -> List[str]:
    out = []
    for rel, got, want in m.wrong_shape[:limit]:
        out.append(f"{rel} is {list(got)} where {m.fp.id} has {list(want)}")
    if m.missing:
        shown = ", ".join(m.missing[:3])
        out.append(f"{len(m.missing)} identifying keys of {m.fp.id} are missing, e.g. {shown}")
    out.extend(m.count_problems)
    for a in m.absent_present:
        out.append(f"{a} is present but {m.fp.id} does not have it")
    return out


def _variant(det: Detection, fp: Fingerprint, prefix: str, tensors) -> None:
    v = fp.variant
    if not v:
        return
    t = tensors.get(prefix + v["key"])
    if t is None or len(t.shape) <= v["dim"]:
        return
    n = t.shape[v["dim"]]
    name = v["values"].get(str(n))
    det.variant = name or f"unknown ({n} input channels)"
    if name != "normal":
        det.evidence.append(f"{v['key']} takes {n} input channels: {det.variant} variant")
        if name is None:
            det.warnings.append(f"{v['key']} takes {n} input channels, which no known variant of {fp.name} has")


def _components(det: Detection, fp: Fingerprint, prefix: str, tensors, lay) -> None:
    leftovers = lay["extra_keys"]["_leftover"]
    comps: Dict[str, ComponentInfo] = {
        name: ComponentInfo(name, "missing", expected_tensors=c.tensors, expected_params=c.params, required=c.required)
        for name, c in fp.components.items()
    }
    extra: Counter = Counter()
    other_prefixes = [(c.name, p) for c in fp.components.values() if c.name != "unet" for p in c.prefixes]
    for k, t in tensors.items():
        owner = None
        for name, p in other_prefixes:
            if k.startswith(p):
                owner = name
                break
        if owner is None and k in MARKER_KEYS:
            continue
        if owner is None and any(r.search(k) for r in leftovers):
            extra["training leftovers (EMA copy, scheduler buffers, position ids)"] += 1
            continue
        if owner is None and k.startswith(prefix):
            owner = "unet"
        if owner is None:
            extra["keys outside every component"] += 1
            continue
        ci = comps[owner]
        ci.tensors += 1
        if t.is_float:
            ci.params += t.numel
            ci.bytes += t.nbytes
        lab = dtype_label(t.dtype)
        ci.dtypes[lab] = ci.dtypes.get(lab, 0) + t.nbytes
    expected_params = 0
    expected_bytes = 0
    for ci in comps.values():
        if ci.tensors == 0:
            ci.status = "missing"
            if ci.required and ci.name != "unet":
                det.evidence.append(f"no {ci.name} in the file")
            continue
        if ci.expected_params is None:
            ci.status = "present"
            continue
        expected_params += ci.expected_params
        itemsize = ci.bytes / ci.params if ci.params else 2
        expected_bytes += int(ci.expected_params * itemsize)
        ratio = ci.params / ci.expected_params if ci.expected_params else 0
        if ratio < 0.995:
            ci.status = "partial"
            det.warnings.append(
                f"{ci.name}: {ci.params:,} parameters where {fp.name} has {ci.expected_params:,} "
                f"({ci.tensors} of {ci.expected_tensors} tensors)"
            )
        else:
            ci.status = "present"
            if ratio > 1.005:
                det.warnings.append(f"{ci.name}: {ci.params:,} parameters, more than the reference {ci.expected_params:,}")
    det.components = comps
    det.extra_keys = dict(extra)
    for what, n in extra.items():
        det.evidence.append(f"{n} {what}")
    det.expected_params = expected_params or None
    det.expected_data_bytes = expected_bytes or None


def _prediction(det: Detection, fp: Fingerprint, prefix: str, header: SafetensorsHeader, read_probe: bool) -> None:
    found = {MARKER_KEYS[k] for k in det.markers}
    if fp.prediction in ("flow",):
        det.prediction, det.prediction_source = "flow", f"{fp.name} is a rectified-flow model"
        return
    if "edm_v" in found:
        det.prediction, det.prediction_source = "v (EDM)", "marker keys edm_vpred.sigma_min/max"
    elif "edm" in found:
        det.prediction, det.prediction_source = "EDM", "marker keys edm_mean/edm_std"
    elif "v" in found:
        det.prediction, det.prediction_source = "v", "marker key v_pred"
    probe = fp.prediction_probe
    if probe and det.prediction == "unknown":
        key = prefix + probe["key"]
        t = header.tensors.get(key)
        if t is not None and t.is_float and read_probe:
            std = _tensor_std(header, key)
            if std is not None:
                pred = probe["then"] if std > probe["std_above"] else probe["else"]
                det.prediction = pred
                det.prediction_source = f"std of {probe['key']} is {std:.3f} ({'>' if std > probe['std_above'] else '<='} {probe['std_above']}; {probe['why']})"
        elif not read_probe:
            det.prediction_source = "not probed (reading one tensor was not allowed)"
    if det.prediction == "unknown" and fp.prediction in ("eps",):
        det.prediction, det.prediction_source = "eps", f"{fp.name} default (no v_pred/EDM marker keys)"
    if "ztsnr" in found:
        det.prediction += " + ztsnr"
        det.prediction_source += "; marker key ztsnr"
    det.evidence.append(f"prediction {det.prediction}: {det.prediction_source}")


def _tensor_std(header: SafetensorsHeader, key: str) -> Optional[float]:
    """Standard deviation of one tensor, read directly from its byte range (numpy, no torch import)."""
    import numpy as np

    t = header.tensors[key]
    try:
        with open(header.path, "rb") as f:
            f.seek(header.data_start + t.begin)
            raw = f.read(t.nbytes)
    except OSError:
        return None
    if len(raw) != t.nbytes:
        return None
    if t.dtype == "BF16":
        x = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    elif t.dtype in ("F16", "F32", "F64"):
        x = np.frombuffer(raw, dtype={"F16": "<f2", "F32": "<f4", "F64": "<f8"}[t.dtype]).astype(np.float64)
    else:
        return None
    return float(np.std(x, ddof=1)) if x.size > 1 else 0.0


# ---------------------------------------------------------------------------------------------------------------
# name-recognised layouts and metadata


def _name_layout(tensors, lay) -> Optional[Tuple[dict, float]]:
    best = None
    n = len(tensors)
    for L in lay["layouts"]:
        hits = sum(1 for k in tensors if any(r.search(k) for r in L["_re"]))
        frac = hits / n
        if frac >= L["min_fraction"] and (best is None or frac > best[1]):
            best = (L, frac)
    return best


def _fill_name_layout(det: Detection, found: Tuple[dict, float], tensors) -> None:
    L, frac = found
    det.layout = L["id"]
    det.layout_name = L["name"]
    det.arch_id = "unknown"
    det.arch_name = L["name"]
    det.refusal = f"{L['name']}: {L['why_refused']}"
    det.evidence.append(f"{frac:.0%} of the keys follow the {L['name']} naming")
    for pat, dim, table in L["_hints"]:
        for k, t in tensors.items():
            if pat.search(k) and len(t.shape) > dim:
                fam = table.get(str(t.shape[dim]))
                if fam:
                    det.family = fam
                    det.closest = {"sdxl": "sdxl_base", "flux": "flux_dev"}.get(fam, fam)
                    det.evidence.append(f"{k} has shape {list(t.shape)}: {fam} family")
                break
        if det.family != "unknown":
            break


def _claim_family(value: str, rules) -> Optional[str]:
    v = value.lower()
    for sub, fam in rules:
        if sub in v:
            return fam
    return None


def _metadata_claims(det: Detection, header: SafetensorsHeader, lay) -> None:
    mc = lay["metadata_claims"]
    md = header.metadata
    for key in mc["keys"]:
        if md.get(key):
            det.metadata_claims[key] = md[key][:200]
            if det.claimed_family is None:
                det.claimed_family = _claim_family(md[key], mc["rules"])
    for key in mc["prediction_keys"]:
        if md.get(key):
            v = md[key].strip().lower()
            det.metadata_claims[key] = md[key][:100]
            for sub, pred in mc["prediction_rules"]:
                if v == sub or (len(sub) > 2 and sub in v):
                    det.claimed_prediction = pred
                    break
            if det.claimed_prediction:
                break
    stem = os.path.splitext(det.file_name)[0]
    name_fam = _claim_family(stem, [r for r in mc["rules"] if len(r[0]) >= 4])
    if name_fam:
        det.metadata_claims["file name"] = stem
        if det.claimed_family is None:
            det.claimed_family = name_fam


def _family_agrees(claimed: str, family: str) -> bool:
    return claimed == family or family.startswith(claimed) or claimed.startswith(family)


def _finish_claims(det: Detection) -> None:
    if det.claimed_family and det.family != "unknown" and not _family_agrees(det.claimed_family, det.family):
        src = next(iter(det.metadata_claims), "metadata")
        det.disagreements.append(
            f"{src} says {det.claimed_family} ({det.metadata_claims.get(src, '')!s}), structure says {det.family}"
        )
    if det.claimed_prediction and det.prediction not in ("unknown",):
        base = det.prediction.split(" ")[0]
        if det.claimed_prediction != base and not (det.claimed_prediction == "v" and base == "v"):
            det.disagreements.append(
                f"metadata says prediction {det.claimed_prediction}, structure says {det.prediction}"
            )


# ---------------------------------------------------------------------------------------------------------------
# ModelSpec


@functools.lru_cache(maxsize=1)
def _modelspec_table() -> dict:
    return load_json("modelspec.json")


def modelspec_architecture(det: Detection) -> str:
    """The ``modelspec.architecture`` string for a detection (``data/modelspec.json``); ``"unknown"`` for a file
    whose structure matches no architecture, even where its key names follow one."""
    table = _modelspec_table()
    entry = table["architectures"].get(det.arch_id) if det.known else None
    if entry is None:
        return "unknown"
    if isinstance(entry, dict):
        base = det.prediction.split(" ")[0]
        entry = entry.get("by_prediction", {}).get(base, entry["default"])
    return entry + table["variant_suffix"].get(det.variant, "")
