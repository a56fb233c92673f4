"""Compatibility preflight: can these N files be merged, component by component, and will it fit?

``check_compatibility(paths, device="cpu")`` reads only headers (plus SD2's one probe tensor) and returns a
:class:`CompatReport`: a verdict (``ok``, ``ok_with_options``, ``incompatible``), per component which files have it,
missing or extra keys, shape mismatches, dtype mixes and input-channel variants, the options a user has (drop a
component, take it from one model, merge the common input channels of an inpainting model), and estimates of the
merge's peak RAM, VRAM, output size and the free disk at the output folder.

``check_headers`` does the same for headers already read (a merge reads each header once) and also holds the one
whole-file key and shape comparison (:func:`.keys.compare_keys`) in ``report.keys``, which the engine's gate reuses.
Rendering is elsewhere (:mod:`merger_core.report`); :func:`require_compatible` raises with the list of problems.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from ..errors import IncompatibleModelsError
from ..io.safetensors import DTYPE_SIZES, FLOAT_DTYPES, SafetensorsHeader, dtype_label, read_header
from ..io.writer import FREE_DISK_MARGIN
from ..units import human_bytes, mem_available
from .detect import Detection, canonical_names, detect_header, merge_view
from .fingerprints import UNET_PREFIX, get_fingerprint
from .keymap import KeyNames, canonical_view
from .keys import KeyReport, compare_keys, compare_tensors

SHOW = 5
OUT_ITEMSIZE = {"fp16": 2, "bf16": 2, "fp32": 4}
PROCESS_OVERHEAD = 600 * 1024 * 1024  # Python + torch loaded, measured roughly on Linux
CPU_CHUNK_BYTES = (2 + 8) * (1 << 20) * 4  # engine: fp32 accumulator + scratch chunk + writer ring of 8 chunks


@dataclass
class ComponentCompat:
    name: str
    status: str  # same | missing_in_some | variant_differs | shapes_differ | keys_differ
    present_in: List[int] = field(default_factory=list)
    missing_in: List[int] = field(default_factory=list)
    keys: int = 0
    keys_missing: Dict[int, List[str]] = field(default_factory=dict)  # file index -> keys others have (first few)
    keys_missing_count: Dict[int, int] = field(default_factory=dict)
    shape_mismatch: Dict[str, Dict[int, List[int]]] = field(default_factory=dict)  # first few
    shape_mismatch_count: int = 0
    dtypes: Dict[int, str] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    options: List[str] = field(default_factory=list)


@dataclass
class Estimates:
    output_bytes: int = 0
    largest_tensor_params: int = 0
    peak_ram_bytes_linear: int = 0  # weighted sum, add difference: chunked on the CPU
    peak_ram_bytes_tensorwise: int = 0  # TIES, DARE, SLERP...: whole tensors in fp32
    vram_bytes: Optional[int] = None
    vram_free_bytes: Optional[int] = None
    ram_available_bytes: Optional[int] = None
    disk_free_bytes: Optional[int] = None
    output_folder: str = ""
    device: str = "cpu"
    fits: bool = True
    problems: List[str] = field(default_factory=list)


@dataclass
class CompatReport:
    files: List[str]
    detections: List[Detection]
    verdict: str = "ok"  # ok | ok_with_options | incompatible
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    options: List[str] = field(default_factory=list)
    components: Dict[str, ComponentCompat] = field(default_factory=dict)
    estimates: Estimates = field(default_factory=Estimates)
    keys: Optional[KeyReport] = None  # the whole-file key and shape comparison (full key names)
    key_names: List[KeyNames] = field(default_factory=list)  # each file's key layout and canonical names
    canonical: bool = False  # True: ``keys`` compares canonical names (the files' key layouts differ)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["detections"] = [x.to_dict() for x in self.detections]
        d.pop("keys", None)
        d["key_names"] = [{"keymap": k.keymap, "layout": k.layout, "layout_name": k.layout_name, "namings": k.namings,
                           "refusal": k.refusal} for k in self.key_names]
        return d


def layouts_differ(kns: Sequence[KeyNames]) -> bool:
    """Whether files of one keymap name the same tensors differently (then they are compared by canonical name)."""
    if len({k.keymap for k in kns}) != 1 or kns[0].keymap is None:
        return False
    shared = set.intersection(*(set(k.namings) for k in kns))
    if any(len({k.namings[c] for k in kns}) > 1 for c in shared):
        return True
    return any(k.renamed for k in kns) and not all(k.renamed for k in kns)


def _component_keys(det: Detection, header, prefix: Optional[str] = None) -> Dict[str, Dict[str, Tuple[str, Tuple[int, ...]]]]:
    """component -> {key relative to the component's prefix: (dtype, shape)} for one file (``prefix``: the
    diffusion model's prefix in ``header``, default the detected one)."""
    out: Dict[str, Dict[str, Tuple[str, Tuple[int, ...]]]] = {}
    if not det.known:
        out["all keys"] = {k: (t.dtype, t.shape) for k, t in header.tensors.items()}
        return out
    fp = get_fingerprint(det.arch_id)
    markers = set(det.markers)
    unet_prefix = det.unet_prefix or "" if prefix is None else prefix
    for k, t in header.tensors.items():
        comp = fp.component_of(k, unet_prefix)
        if comp is None:
            comp = "markers" if k in markers else "other keys"
            rel = k
        elif comp == "unet":
            rel = k[len(unet_prefix):]
        else:
            rel = next(k[len(p):] for p in fp.components[comp].prefixes if k.startswith(p))
        out.setdefault(comp, {})[rel] = (t.dtype, t.shape)
    return out


def check_compatibility(
    paths: Sequence[str | os.PathLike],
    device: str = "cpu",
    output_path: Optional[str | os.PathLike] = None,
    out_dtype: str = "keep",
) -> CompatReport:
    """Check whether ``paths`` can be merged (headers only). See the module docstring."""
    headers = [read_header(os.fspath(p)) for p in paths]
    return check_headers(headers, device=device, output_path=output_path, out_dtype=out_dtype)


def check_headers(
    headers: Sequence[SafetensorsHeader],
    device: str = "cpu",
    output_path: Optional[str | os.PathLike] = None,
    out_dtype: str = "keep",
    names: Optional[Sequence[str]] = None,
    canonical: Optional[bool] = None,
) -> CompatReport:
    """:func:`check_compatibility` for headers already read; ``names`` label the files (default: unique basenames).

    Files of one architecture whose key layouts differ (a bare BFL Flux file and a ComfyUI checkpoint, diffusers
    UNet names and LDM names) are compared by their canonical names (:mod:`.keymap`); ``canonical=True`` compares
    canonical names even where the layouts agree."""
    paths = [h.path for h in headers]
    kns = [canonical_names(h) for h in headers]
    dets = [detect_header(h, key_names=kn) for h, kn in zip(headers, kns)]
    headers = [merge_view(h) for h in headers]  # keys compared as the merge sees them (no scaled fp8 scales)
    views = [canonical_view(h, kn) for h, kn in zip(headers, kns)]
    same_map = len({k.keymap for k in kns}) == 1 and kns[0].keymap is not None
    use_canonical = same_map and (layouts_differ(kns) if canonical is None else canonical)
    names = list(names) if names is not None else _unique_names(paths)
    rep = CompatReport(files=names, detections=dets, keys=compare_keys(views if use_canonical else headers, names),
                       key_names=kns, canonical=use_canonical)
    if len(paths) < 2:
        rep.notes.append("only one file: nothing to compare")

    # architecture level
    for i, d in enumerate(dets):
        if not d.known:
            rep.problems.append(f"{names[i]}: architecture not recognised ({d.refusal or 'unknown layout'})")
        elif not d.mergeable:
            rep.problems.append(f"{names[i]}: {d.refusal}")
    known = [(i, d) for i, d in enumerate(dets) if d.known]
    fams = {d.family for _, d in known}
    if len(fams) > 1:
        rep.problems.append(
            "different model families: " + ", ".join(f"{names[i]} is {d.arch_name} ({d.family})" for i, d in known)
            + "; their diffusion models cannot be merged"
        )
    prefixes = {d.unet_prefix for _, d in known}
    prefix_differs = len(prefixes) > 1 and len(fams) == 1 and not same_map
    if same_map and len({k.layout for k in kns}) > 1:
        rep.notes.append(
            "key layouts differ: " + ", ".join(f"{names[i]}: {k.layout_name}" for i, k in enumerate(kns))
            + "; they are compared and merged by their canonical (ComfyUI checkpoint) names"
        )
    if prefix_differs:
        rep.notes.append(
            "the diffusion model's keys use different prefixes: "
            + ", ".join(f"{names[i]}: {d.unet_prefix!r}" for i, d in known)
            + "; they are compared by their names inside the component"
        )
        rep.options.append(
            "unet: the merge engine matches full key names, so give every file the same prefix first "
            "(re-save the diffusion-model-only file as a checkpoint, or the checkpoint's diffusion model alone)"
        )
    preds = {d.prediction for _, d in known}
    if len(preds) > 1 and len(fams) == 1:
        rep.notes.append(
            "prediction types differ: " + ", ".join(f"{names[i]} {d.prediction}" for i, d in known)
            + " (a merge of eps and v models is allowed but usually needs the output's prediction type set by hand)"
        )

    # component level
    # components are read from the canonical names (a diffusers-named UNet is the unet component too)
    per_file = [_component_keys(d, v, UNET_PREFIX if k.keymap else None) for d, v, k in zip(dets, views, kns)]
    comp_names: List[str] = []
    for pf in per_file:
        for c in pf:
            if c not in comp_names:
                comp_names.append(c)
    for c in comp_names:
        rep.components[c] = _compare_component(c, [pf.get(c) for pf in per_file], dets, names)
    for cc in rep.components.values():
        rep.options.extend(cc.options)
    statuses = {cc.status for cc in rep.components.values() if cc.name not in ("markers",)}
    if rep.problems or "shapes_differ" in statuses:
        rep.verdict = "incompatible"
        for cc in rep.components.values():
            if cc.status == "shapes_differ" and len(fams) <= 1:
                rep.problems.append(f"{cc.name}: {cc.shape_mismatch_count} tensors differ in shape")
    elif statuses - {"same"} or prefix_differs:
        rep.verdict = "ok_with_options"
    rep.estimates = _estimates(headers, per_file, device, output_path, out_dtype)
    if not rep.estimates.fits:
        rep.problems.extend(rep.estimates.problems)
        if rep.verdict != "incompatible":
            rep.verdict = "incompatible"
    return rep


def _unique_names(paths: Sequence[str]) -> List[str]:
    base = [os.path.basename(p) for p in paths]
    return [b if base.count(b) == 1 else f"{b} (#{i + 1})" for i, b in enumerate(base)]


def _compare_component(name: str, per: List[Optional[dict]], dets: List[Detection], names: List[str]) -> ComponentCompat:
    cc = ComponentCompat(name=name, status="same")
    kr = compare_tensors([{k: v[1] for k, v in p.items()} if p else None for p in per], names)
    cc.missing_in = list(kr.absent)
    cc.present_in = [i for i in range(len(per)) if i not in kr.absent]
    have = [(i, per[i]) for i in cc.present_in]
    cc.keys = kr.union_keys
    for i, lack in kr.missing.items():
        cc.keys_missing[i] = lack[:SHOW]
        cc.keys_missing_count[i] = len(lack)
    variant_keys = set()
    for d in dets:
        if d.known:
            vk = get_fingerprint(d.arch_id).variant.get("key")
            if vk:
                variant_keys.add(vk)
    only_variant = True
    for k, shapes in kr.shape_mismatch.items():
        cc.shape_mismatch_count += 1
        if len(cc.shape_mismatch) < SHOW:
            cc.shape_mismatch[k] = {i: list(s) for i, s in shapes.items()}
        if not (name == "unet" and k in variant_keys):
            only_variant = False
    for i, p in have:
        by: Dict[str, int] = {}
        for dt, shape in p.values():
            if dt in FLOAT_DTYPES:
                by[dtype_label(dt)] = by.get(dtype_label(dt), 0) + math.prod(shape) * DTYPE_SIZES[dt]
        if by:
            cc.dtypes[i] = max(by, key=by.get) if len(by) == 1 else "mixed (" + ", ".join(sorted(by)) + ")"
    if len(set(cc.dtypes.values())) > 1:
        cc.notes.append(
            "dtypes differ: " + ", ".join(f"{names[i]} {v}" for i, v in cc.dtypes.items())
            + " (the merge computes in fp32 and writes the chosen output dtype)"
        )
        if any(v.startswith("fp8") for v in cc.dtypes.values()):
            cc.notes.append("an fp8 input has lost precision already; the result is no better than its fp8 copy")
    if name in ("markers",):
        cc.status = "same" if not cc.keys_missing else "keys_differ"
        if cc.keys_missing:
            cc.notes.append("marker keys (v_pred/ztsnr/EDM) differ: the output takes them from the first model that has them")
        return cc
    if cc.shape_mismatch_count and only_variant:
        cc.status = "variant_differs"
        variants = {i: dets[i].variant for i in cc.present_in}
        cc.notes.append("input-channel variants differ: " + ", ".join(f"{names[i]} {v}" for i, v in variants.items()))
        cc.options.append(
            f"{name}: merge the common input channels of the first convolution and keep the extra channels "
            "(mask/image) from the inpainting/pix2pix model; or use add-difference with the matching base "
            "(inpainting model + (your model - base))"
        )
    elif cc.shape_mismatch_count:
        cc.status = "shapes_differ"
    elif cc.missing_in:
        cc.status = "missing_in_some"
        have_names = ", ".join(names[i] for i in cc.present_in)
        miss_names = ", ".join(names[i] for i in cc.missing_in)
        cc.notes.append(f"{name} is in {have_names} but not in {miss_names}")
        cc.options.append(f"{name}: drop it from the output, or take it from {names[cc.present_in[0]]} unmerged")
    elif cc.keys_missing:
        cc.status = "keys_differ"
        cc.options.append(f"{name}: merge each key over the models that have it (--allow-missing), or drop the extra keys")
    return cc


def _estimates(headers, per_file, device: str, output_path, out_dtype: str) -> Estimates:
    est = Estimates(device=device)
    # the output holds the union of the inputs' keys, counted inside each component (so one model stored with
    # and one without the diffusion-model prefix are not counted twice)
    union: Dict[Tuple[str, str], Tuple[str, Tuple[int, ...]]] = {}
    for pf in per_file:
        for comp, keys in pf.items():
            for k, v in keys.items():
                union.setdefault((comp, k), v)
    out = 0
    largest = 0
    for dt, shape in union.values():
        n = math.prod(shape)
        isz = OUT_ITEMSIZE.get(out_dtype) if dt in FLOAT_DTYPES else None
        out += n * (isz or DTYPE_SIZES[dt])
        largest = max(largest, n)
    est.output_bytes = out + 8 + 64 * len(union)  # + header, roughly
    est.largest_tensor_params = largest
    n_in = len(headers)
    est.peak_ram_bytes_linear = PROCESS_OVERHEAD + CPU_CHUNK_BYTES
    est.peak_ram_bytes_tensorwise = PROCESS_OVERHEAD + (n_in + 2) * largest * 4
    est.ram_available_bytes = mem_available()
    dev = (device or "cpu").lower()
    if dev != "cpu":
        # engine on a GPU: fp32 accumulator + output buffer of the largest key, the inputs of tensor-wise methods
        est.vram_bytes = (n_in + 2) * largest * 4 + 512 * 1024 * 1024
        try:
            import torch

            if dev.startswith("cuda") and torch.cuda.is_available():
                idx = int(dev.split(":")[1]) if ":" in dev else 0
                est.vram_free_bytes = torch.cuda.mem_get_info(idx)[0]
        except Exception:  # estimates only
            est.vram_free_bytes = None
        # host side: two pinned buffers of the largest key
        est.peak_ram_bytes_linear += 2 * largest * 4
        est.peak_ram_bytes_tensorwise = est.peak_ram_bytes_linear
    folder = os.path.dirname(os.path.abspath(os.fspath(output_path))) if output_path else os.path.dirname(os.path.abspath(headers[0].path))
    est.output_folder = folder
    try:
        est.disk_free_bytes = shutil.disk_usage(folder).free
    except OSError:
        est.disk_free_bytes = None
    if est.disk_free_bytes is not None and est.disk_free_bytes < est.output_bytes + FREE_DISK_MARGIN:
        est.fits = False
        est.problems.append(
            f"not enough free disk in {folder}: the output needs about {human_bytes(est.output_bytes)} and "
            f"{human_bytes(FREE_DISK_MARGIN)} are kept free beside it; {human_bytes(est.disk_free_bytes)} are free"
        )
    if est.vram_bytes is not None and est.vram_free_bytes is not None and est.vram_bytes > est.vram_free_bytes:
        est.fits = False
        est.problems.append(
            f"{device}: about {human_bytes(est.vram_bytes)} of GPU memory needed, {human_bytes(est.vram_free_bytes)} free"
        )
    if est.ram_available_bytes is not None and est.peak_ram_bytes_linear > est.ram_available_bytes:
        est.fits = False
        est.problems.append(
            f"about {human_bytes(est.peak_ram_bytes_linear)} of RAM needed, {human_bytes(est.ram_available_bytes)} available"
        )
    return est


def require_compatible(report: CompatReport) -> CompatReport:
    """Raise :class:`IncompatibleModelsError` listing the problems when the verdict is incompatible (the full
    rendering is :func:`merger_core.report.text.render_compat`)."""
    if report.verdict == "incompatible":
        raise IncompatibleModelsError("the models cannot be merged:\n" + "\n".join("  " + p for p in report.problems), report)
    return report
