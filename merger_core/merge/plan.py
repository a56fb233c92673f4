"""Merge plans: what to merge (:class:`MergePlan`), and :func:`prepare`, which turns a plan into per-key jobs.

``prepare`` reads each input's header once, runs the one compatibility pass over them (Analyze Structure's
per-component check, which also holds the whole-file key and shape comparison that gates the merge), checks the
method's typed inputs (a base-taking method's base must have every merged key) and decides for every key whether
it is merged, copied from one input or refused. No weight is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import methods as _methods
from ..arch.compat import CompatReport, check_headers
from ..arch.detect import (
    QUANTIZATION_NAMES,
    REFUSED_QUANTIZATIONS,
    merge_view,
    modelspec_architecture,
    quantization,
    quantization_refusal,
    scaled_fp8_keys,
)
from ..arch.keymap import FIRST, KeyNames, canonical_view, keymap_for, layout_namings, load_keymaps, output_names
from ..arch.keys import KeyReport, compare_keys
from ..errors import IncompatibleModelsError, ManifestError, ModelMergerError
from ..io.safetensors import DTYPE_SIZES, MARKER_KEYS, SafetensorsHeader, dtype_label, read_header
from ..io.writer import OutTensor
from ..report.text import render_compat
from .bake import LoraInput, attach_loras
from .quantize import plan_fp8_output

OUTPUT_DTYPES = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "keep": None,
                 "fp8_scaled": "BF16"}  # fp8_scaled: ComfyUI's scaled fp8 for the linear weights (merge/quantize.py)
# What a merge does with a key whose merged values are NaN or Inf or do not fit the output dtype: stop naming the
# key and the inputs that hold such values, write them as they are and list the keys in the notes, or clamp them
# to the output dtype's range (NaN becomes 0) and list the keys.
NONFINITE_MODES = ("error", "warn", "clamp")


@dataclass
class MergeInput:
    path: str
    weight: float = 1.0
    name: str = ""
    sha256: Optional[str] = None  # full-file SHA-256 when known (manifest, hash cache): recorded in the recipe

    def display_name(self) -> str:
        return self.name or os.path.basename(self.path)


@dataclass
class MergePlan:
    """Everything a merge needs. ``key_params`` and ``key_source`` let callers vary a merge per key:

    * ``key_params(key) -> dict``: parameter values for this key (block weights), overriding ``params``.
    * ``key_source(key) -> int | None``: copy this key from input ``i`` instead of merging it (a text encoder or
      VAE taken from one model). ``None`` merges the key.
    * ``key_weights(key) -> list[float] | None``: per-input weights for this key (block-weighted sums).
    * ``key_delta(key) -> delta | None``: something to add to this key's merged fp32 values before they are checked
      and narrowed (baked LoRAs): ``delta.add_to(values, start)`` adds the delta of elements ``start..start +
      values.numel()`` of the flattened key into the fp32 tensor ``values`` in place (on whatever device it is).

    ``nonfinite`` is one of :data:`NONFINITE_MODES`: what to do with merged values that are NaN or Inf or beyond
    the output dtype's range.

    ``key_layout`` names the key layout of the output (``merger_core/data/keymaps``): ``None`` or ``"first"`` keeps
    the first model's (or, where it lacks a component the output has, the first model's that has them all), a
    layout id (``checkpoint``, ``unet_only``, ``bare``, ``diffusers_unet``, ...) writes that one and leaves out the
    components it has no names for. Inputs whose key layouts differ are merged by their canonical (ComfyUI
    checkpoint) names; the hooks then receive canonical names too.
    """

    inputs: List[MergeInput]
    method: str = "weighted_sum"
    params: Dict[str, object] = field(default_factory=dict)
    normalize: bool = True
    dtype: str = "fp16"
    device: str = "cpu"
    allow_missing: bool = False
    seed: int = 0
    title: Optional[str] = None
    nonfinite: str = "error"
    key_layout: Optional[str] = None  # None / "first": the first model's key layout; else a layout id (keymaps)
    key_params: Optional[Callable[[str], Dict[str, float]]] = None
    key_source: Optional[Callable[[str], Optional[int]]] = None
    key_weights: Optional[Callable[[str], Optional[Sequence[float]]]] = None
    key_delta: Optional[Callable[[str], Optional[object]]] = None
    loras: List["LoraInput"] = field(default_factory=list)  # LoRAs baked into the merged keys (merge/bake.py)
    recipe: Dict[str, object] = field(default_factory=dict)  # extra recipe facts for the metadata
    # how to build this plan again (`model-merger verify`): {"planner": name, "args": {...}}, inputs by index
    replay: Optional[Dict[str, object]] = None
    # the inputs' headers where a planner (cross-merge) has read them already, in input order: read once per merge
    threads: int = 0  # merge workers on the CPU (0: $MODEL_MERGER_THREADS, else the CPUs available less one); bytes never depend on it
    headers: Optional[List[SafetensorsHeader]] = field(default=None, repr=False, compare=False)


@dataclass
class KeyJob:
    name: str
    shape: Tuple[int, ...]
    out_dtype: str
    sources: List[int]  # inputs that have this key, in input order
    copy_from: Optional[int] = None  # copy exactly (or cast) from this input instead of merging
    # inputs whose tensor of this key is scaled fp8 codes -> the key of its scale (the value is codes * scale)
    scales: Dict[int, str] = field(default_factory=dict)
    # inputs that name this key differently in their file (another key layout) -> the name there
    source_names: Dict[int, str] = field(default_factory=dict)

    def source_name(self, i: int) -> str:
        """The name of this key in input ``i``'s file."""
        return self.source_names.get(i, self.name)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.out_dtype]


@dataclass
class PreparedMerge:
    plan: MergePlan
    headers: List[SafetensorsHeader]
    jobs: List[KeyJob]
    method: "_methods.MergeMethod"
    params: Dict[str, object]
    key_report: KeyReport
    architecture: str  # the ModelSpec label of the first input's structure ("unknown" when not recognised)
    structure: str = "unknown"  # the same in words (e.g. "SDXL base", "SD1 layout, non-standard widths")
    notes: List[str] = field(default_factory=list)
    compat: Optional[CompatReport] = None  # per-component check and resource estimates
    lora_report: Optional[object] = None  # what baking the plan's LoRAs does (lora/delta.py LoraReport)
    quant: Optional[object] = None  # a scaled fp8 output's keys (merge/quantize.py QuantPlan)
    given: Optional[MergePlan] = None  # the plan prepare() was given (prep.plan may wrap its per-key hooks)

    @property
    def out_tensors(self) -> List[OutTensor]:
        return [OutTensor(j.name, j.out_dtype, j.shape) for j in self.jobs]

    @property
    def output_bytes(self) -> int:
        return sum(j.out_nbytes for j in self.jobs)

    @property
    def input_bytes(self) -> int:
        return sum(h.data_bytes for h in self.headers)

    @property
    def largest_numel(self) -> int:
        return max((j.numel for j in self.jobs), default=0)


def prepare(plan: MergePlan) -> PreparedMerge:
    """Check the plan and the inputs' keys and shapes; no weight is read. Each header is read once: the plan's
    ``headers`` are used where a planner has read them already."""
    given = plan  # the plan as the caller made it (the prepared one may wrap its hooks)
    method = _methods.get_method(plan.method)
    method.check_inputs(len(plan.inputs))
    params = method.check_params(dict(plan.params))
    if plan.dtype not in OUTPUT_DTYPES:
        raise ManifestError(f"output dtype {plan.dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    if plan.nonfinite not in NONFINITE_MODES:
        raise ManifestError(f"nonfinite {plan.nonfinite!r} is not one of {', '.join(NONFINITE_MODES)}")
    weights = [i.weight for i in plan.inputs]
    for i, w in zip(plan.inputs, weights):
        if not isinstance(w, (int, float)) or w != w or math.isinf(w):
            raise ManifestError(f"{i.display_name()}: weight {w!r} is not a finite number")
    if not math.isfinite(sum(weights)):
        raise ManifestError(f"the weights sum to {sum(weights)!r}, which is not a finite number; use smaller weights")
    if method.uses_weights and plan.normalize and sum(weights) == 0:
        raise ManifestError("the weights sum to 0, so they cannot be normalised")
    headers = list(plan.headers) if plan.headers is not None else [read_header(i.path) for i in plan.inputs]
    names = [i.display_name() for i in plan.inputs]
    notes: List[str] = []
    # Quantized inputs: bitsandbytes 4-bit is refused; scaled fp8 is merged as its dequantized values, so its scale
    # and marker keys leave the key comparison and the output ("logical" headers: the weights alone).
    quants = [quantization(h.tensors) for h in headers]
    for name, q in zip(names, quants):
        if q in REFUSED_QUANTIZATIONS:
            raise IncompatibleModelsError(f"{name} is {quantization_refusal(q)}")
    scale_of: List[Dict[str, str]] = [{} for _ in headers]
    logical = [merge_view(h) for h in headers]
    for i, q in enumerate(quants):
        if q == "scaled_fp8":
            scale_of[i], hidden = _scaled_fp8(headers[i], names[i])
            notes.append(
                f"{names[i]} is {QUANTIZATION_NAMES[q]}: its {len(scale_of[i])} fp8 weights are merged as their values "
                f"(code x scale_weight); its {len(hidden)} scale and marker keys are not written"
            )
    chosen_layout = plan.key_layout if plan.key_layout not in (None, "", FIRST) else None
    compat = _structure_check(plan, headers, names, canonical=True if chosen_layout else None)
    if chosen_layout is not None and (compat is None or not compat.canonical):
        raise ManifestError(
            f"key layout {chosen_layout!r}: the inputs are not all of one architecture whose key layouts are known "
            "(see docs/formats.md), so their keys cannot be renamed; leave the key layout at 'first'"
        )
    canonical = compat is not None and compat.canonical
    if canonical:
        for name, kn in zip(names, compat.key_names):
            if kn.refusal:
                raise IncompatibleModelsError(f"{name} cannot be renamed to the other models' key names: {kn.refusal}")
    kns: List[KeyNames] = compat.key_names if compat is not None else [KeyNames(names={k: k for k in h.tensors}) for h in logical]
    views = [canonical_view(h, kn) for h, kn in zip(logical, kns)] if canonical else logical
    file_names = [kn.file_names() for kn in kns] if canonical else [None] * len(logical)
    report = compat.keys if compat is not None else compare_keys(logical, names)
    elsewhere, comp_notes = _components_elsewhere(kns, views, canonical, report, names)
    if elsewhere:
        gate = dataclasses.replace(report, missing={
            i: [k for k in ks if k not in elsewhere.get(i, ())] for i, ks in report.missing.items()
        })
        gate.missing = {i: ks for i, ks in gate.missing.items() if ks}
        report = gate
        notes.extend(comp_notes)
    if report.shape_mismatch or (report.missing and not plan.allow_missing):
        hint = "" if report.shape_mismatch else "\n(use --allow-missing to merge each key over the models that have it)"
        structure = "" if compat is None else "\n\nstructure (Analyze Structure):\n" + render_compat(compat)
        raise IncompatibleModelsError(
            "the models cannot be merged key by key:\n" + report.describe() + hint + structure, report
        )
    all_keys = sorted({k for h in views for k in h.tensors})
    out_name: Dict[str, Optional[str]] = {k: k for k in all_keys}
    if canonical:
        out_name = _output_names(all_keys, kns, names, chosen_layout, notes)
    kinds = method.input_kinds(len(plan.inputs))
    base = kinds.index("base") if "base" in kinds else None
    jobs: List[KeyJob] = []
    kept_as: Dict[int, str] = {}  # dtype keep: the dtype a scaled fp8 model's weights are written in
    if report.missing:
        notes.append("merged with missing keys: " + report.describe())
    for key in all_keys:
        out = out_name[key]
        if out is None:  # a component the chosen key layout has no names for
            continue
        sources = [i for i, h in enumerate(views) if key in h.tensors]
        first = views[sources[0]].tensors[key]
        kinds_of = {views[i].tensors[key].is_float for i in sources}
        if len(kinds_of) > 1:
            shown = ", ".join(f"{names[i]} {views[i].tensors[key].dtype}" for i in sources)
            raise IncompatibleModelsError(
                f"{key} holds integers in some models and floats in others ({shown}); integer codes cannot be "
                "averaged with weights, and a float tensor cannot be copied into an integer one"
            )
        copy_from = None
        if not first.is_float or key in MARKER_KEYS:
            copy_from = sources[0]
        elif plan.key_source is not None:
            chosen = plan.key_source(key)
            if chosen is not None:
                if chosen not in sources:
                    raise IncompatibleModelsError(f"{key} is taken from {names[chosen]}, which does not have it")
                copy_from = chosen
        if copy_from is None and key in elsewhere.get("any", ()) and (
            len(sources) == 1 or (base is not None and base not in sources) or len(sources) < method.min_inputs
        ):
            copy_from = sources[0]  # a component only full checkpoints have, beside a diffusion-model-only file
        if copy_from is None and base is not None and base not in sources:
            raise IncompatibleModelsError(
                f"{key}: the base ({names[base]}) lacks this key, so {method.name} has no difference to take for it "
                "(give a base that has every key, or take this key from one model)"
            )
        if copy_from is not None and (not views[copy_from].tensors[key].is_float or key in MARKER_KEYS):
            out_dtype = views[copy_from].tensors[key].dtype  # integers and markers keep their bytes
        else:
            chosen = copy_from if copy_from is not None else sources[0]
            out_dtype = OUTPUT_DTYPES[plan.dtype]
            src_key = file_names[chosen][key] if canonical else key
            if out_dtype is None and src_key in scale_of[chosen]:  # fp8 codes mean nothing without their scale
                if chosen not in kept_as:
                    kept_as[chosen] = _plain_float_dtype(logical[chosen], scale_of[chosen])
                out_dtype = kept_as[chosen]
            out_dtype = out_dtype or views[chosen].tensors[key].dtype
        if copy_from is None and len(sources) < method.min_inputs:
            if method.roles:  # a role-bound method cannot merge a key some roles lack: keep the first model's
                copy_from = sources[0]
                notes.append(f"{key}: only in {len(sources)} model(s); copied from {names[sources[0]]}")
        in_file = {i: (file_names[i][key] if canonical else key) for i in sources}
        scales = {i: scale_of[i][in_file[i]] for i in sources if in_file[i] in scale_of[i]}
        renamed = {i: n for i, n in in_file.items() if n != out}
        jobs.append(KeyJob(out, first.shape, out_dtype, sources, copy_from, scales, renamed))
    if canonical:
        jobs.sort(key=lambda j: j.name)
        plan = _canonical_hooks(plan, {out_name[k]: k for k in all_keys if out_name[k] is not None})
    for i, dt in kept_as.items():
        notes.append(
            f"dtype keep: the scaled fp8 weights of {names[i]} are written as {dtype_label(dt)}, the dtype of its other "
            "tensors (fp8 codes cannot be kept without their scales)"
        )
    det = compat.detections[0] if compat is not None else None
    arch = modelspec_architecture(det) if det is not None else "unknown"
    structure = det.arch_name if det is not None else "unknown"
    to_canonical = {out_name[k]: k for k in all_keys if out_name[k] not in (None, k)} if canonical else {}
    plan, lora_report = attach_loras(plan, jobs, to_canonical, notes)
    prep = PreparedMerge(plan, headers, jobs, method, params, report, arch, structure, notes, compat, lora_report,
                         given=given)
    plan_fp8_output(prep)
    return prep


def _components_elsewhere(kns: Sequence[KeyNames], views, canonical: bool, report: KeyReport, names):
    """Keys a diffusion-model-only input lacks because it has no text encoder or VAE at all: ``{input: keys,
    "any": every such key}`` and the notes saying where those components come from. They do not block the merge:
    they come from the models that have them (copied from the one, or merged over several)."""
    maps = {k.keymap for k in kns}
    if len(maps) != 1 or None in maps or not report.missing:
        return {}, []
    km = load_keymaps()[kns[0].keymap]
    canon_of: Dict[str, str] = {}
    for kn in kns:
        for fk, ck in kn.names.items():
            canon_of.setdefault(ck if canonical else fk, ck)

    def component(k: str) -> Optional[str]:
        return "markers" if k in MARKER_KEYS else km.canonical_component(canon_of.get(k, k))

    out: Dict[object, set] = {}
    notes: List[str] = []
    for i, kn in enumerate(kns):
        if set(kn.namings) != {"unet"}:
            continue
        lack = [k for k in report.missing.get(i, []) if component(k) not in (None, "unet")]
        if not lack:
            continue
        out[i] = set(lack)
        by_comp: Dict[str, List[str]] = {}
        for k in lack:
            by_comp.setdefault(component(k), []).append(k)
        parts = []
        for c, ks in by_comp.items():
            have = [j for j, v in enumerate(views) if ks[0] in v.tensors]
            how = (f"copied unmerged from {names[have[0]]}" if len(have) == 1
                   else "merged over " + ", ".join(names[j] for j in have))
            parts.append(f"{c} ({len(ks)} keys) {how}")
        notes.append(f"{names[i]} holds only the diffusion model; the components it lacks come from the other "
                     "models: " + "; ".join(parts))
    if out:
        out["any"] = set().union(*out.values())
    return out, notes


def _output_names(all_keys: Sequence[str], kns: Sequence[KeyNames], names, chosen: Optional[str], notes: List[str]):
    """canonical key -> output name (None: left out) for inputs merged by canonical name, in the chosen key layout
    or the first model's (the first model's that holds every component of the output, else a full checkpoint's)."""
    km = load_keymaps()[kns[0].keymap]
    comps = [c for c in km.namings if any(km.canonical_component(k) == c for k in all_keys)]
    if chosen is not None:
        try:
            namings = layout_namings(km, chosen)
        except KeyError as exc:
            raise ManifestError(f"key layout: {exc.args[0]}") from None
        lname = km.layouts[chosen].name
    else:
        pick = next((i for i, kn in enumerate(kns) if set(comps) <= set(kn.namings)), None)
        if pick is None:
            namings = layout_namings(km, "checkpoint")
            lname = km.layouts["checkpoint"].name
            notes.append(f"no input has every component of the output ({', '.join(comps)}): it is written as a {lname}")
        else:
            namings, lname = dict(kns[pick].namings), kns[pick].layout_name
            if pick != 0:
                lacks = [c for c in comps if c not in kns[0].namings]
                notes.append(f"{names[0]} has no {', '.join(lacks)}, which the output holds: the output is written in "
                             f"the key layout of {names[pick]}")
    out = output_names(all_keys, km, namings)
    left = [c for c in comps if c not in namings]
    if left:
        n = sum(1 for v in out.values() if v is None)
        notes.append(f"key layout {lname} has no names for {', '.join(left)}: their {n} keys are left out of the output")
    seen: Dict[str, str] = {}
    for k, v in out.items():
        if v is not None and seen.setdefault(v, k) != k:
            raise IncompatibleModelsError(f"{seen[v]} and {k} would both be written as {v} in key layout {lname}")
    layouts = "; ".join(f"{names[i]}: {kn.layout_name}" for i, kn in enumerate(kns))
    notes.append(f"key layouts: {layouts}; merged by canonical (ComfyUI checkpoint) names, written as {lname}")
    return out


def _canonical_hooks(plan: MergePlan, to_canonical: Dict[str, str]) -> MergePlan:
    """The plan whose per-key hooks are called with canonical names where the runner passes output names."""
    hooks = {}
    for name in ("key_params", "key_weights", "key_delta"):
        fn = getattr(plan, name)
        if fn is not None:
            hooks[name] = (lambda f: lambda key: f(to_canonical.get(key, key)))(fn)
    return dataclasses.replace(plan, **hooks) if hooks else plan


def _scaled_fp8(header: SafetensorsHeader, name: str) -> Tuple[Dict[str, str], List[str]]:
    """{weight key: scale key} and the keys a dequantized output leaves out, for a scaled fp8 input; refuses a
    scale that is not one float per layer (the only kind ComfyUI writes)."""
    scales, hidden = scaled_fp8_keys(header.tensors)
    for weight, key in scales.items():
        t = header.tensors[key]
        if not t.is_float or t.numel != 1:
            raise IncompatibleModelsError(
                f"{name}: {key} holds {t.numel} {t.dtype} values where ComfyUI's scaled fp8 has one float per layer; "
                "this quantized layout is not supported (merge the unquantized model instead)"
            )
    return scales, hidden


def _plain_float_dtype(header: SafetensorsHeader, scaled: Dict[str, str]) -> str:
    """The float dtype holding most of a scaled fp8 model's other tensors (its compute dtype), F16 when none."""
    by: Counter = Counter()
    for k, t in header.tensors.items():
        if t.is_float and k not in scaled and not t.dtype.startswith("F8"):
            by[t.dtype] += t.nbytes
    return by.most_common(1)[0][0] if by else "F16"


def _structure_check(plan: MergePlan, headers, names, canonical: Optional[bool] = None) -> Optional[CompatReport]:
    """The one compatibility pass (headers only), or None where it cannot run.

    It explains a refusal per component (UNet, text encoders, VAE) and estimates memory and disk; its whole-file
    key comparison is the merge's gate, so ``allow_missing`` keeps its meaning.
    """
    try:
        return check_headers(headers, device=plan.device, out_dtype=plan.dtype, names=names, canonical=canonical)
    except ModelMergerError:
        return None


def plan_from_manifest(manifest, *, check_files: bool = True, **overrides) -> MergePlan:
    """Validate a :class:`~merger_core.manifest.Manifest` and turn it into a :class:`MergePlan`.

    ``overrides`` replace manifest fields first (``device="cuda:0"``, ``dtype="bf16"`` from a command line).
    A method that takes a base model (``takes_base = True`` on the method) gets the base as input 0 with
    weight 0; ``plan.recipe["base_input"]`` is then 0.
    """
    import dataclasses

    from ..manifest.model import display_names
    from ..manifest.validate import validate

    m = dataclasses.replace(manifest, **overrides) if overrides else manifest
    validate(m, check_files=check_files)
    method = _methods.get_method(m.method)
    paths = [e.path for e in m.models]
    recipe: Dict[str, object] = {}
    if m.base is not None and method.takes_base:
        paths = [m.base] + paths
    names = display_names(paths)
    inputs = []
    offset = len(paths) - len(m.models)
    if offset:
        inputs.append(MergeInput(path=m.base, weight=0.0, name=names[0]))
        recipe["base_input"] = 0
        recipe["base"] = names[0]
    for e, name in zip(m.models, names[offset:]):
        inputs.append(MergeInput(path=e.path, weight=float(e.weight), name=name, sha256=e.sha256))
    loras = [LoraInput(e.path, float(e.strength_model), float(e.strength_clip), sha256=e.sha256) for e in m.loras]
    return MergePlan(
        inputs=inputs,
        method=m.method,
        params=dict(m.params),
        normalize=m.normalize,
        dtype=m.dtype,
        device=m.device,
        allow_missing=m.allow_missing,
        seed=m.seed,
        title=m.title,
        nonfinite=m.nonfinite,
        key_layout=m.key_layout,
        recipe=recipe,
        loras=loras,
        replay={"planner": "manifest", "args": _replay_manifest(m, method, offset)},
    )


def _replay_manifest(m, method, offset: int) -> Dict[str, object]:
    """The manifest as `model-merger verify` rebuilds it: model paths replaced by input indexes."""
    from ..manifest.parse import manifest_to_dict

    doc = manifest_to_dict(m)
    doc.pop("notes", None)
    doc["models"] = [{"path": k + offset, "weight": e["weight"]} for k, e in enumerate(doc.get("models", []))]
    if doc.get("loras"):  # LoRAs by index into the record's "loras"
        doc["loras"] = [dict(e, path=k) for k, e in enumerate(doc["loras"])]
        for e in doc["loras"]:
            e.pop("sha256", None)
    if offset:
        doc["base"] = 0
    elif "base" in doc:
        doc.pop("base")
    return doc
