"""Cross-lineage merging: ``base + L * combine(M_1 - base, ..., M_n - base)``, one key at a time.

Models fine-tuned from one common base (Pony v6 and Illustrious XL are both SDXL) are merged by their differences
from that base, so each keeps what its training added instead of being averaged away. This module only plans:
it checks structure from the headers (no weight is read before every check has passed), chooses the base, decides
for every key whether it is merged by differences or copied from the base or one model (text encoders, VAE), and
hands an ordinary :class:`~merger_core.merge.plan.MergePlan` to the engine with a registry method
(``task_arithmetic`` for ``sum``, ``ties``, ``dare``) whose first input is the base. Nothing intermediate is
written.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from .bake import LoraInput
from .plan import MergeInput, MergePlan, prepare
from .runner import MergeResult, merge_to_file, merge_to_state_dict
from ..errors import IncompatibleModelsError, ManifestError, ModelMergerError
from ..io.safetensors import read_header

COMBINE_METHODS = {"sum": "task_arithmetic", "ties": "ties", "dare": "dare"}
COMPONENT_CHOICES = ("delta", "base")  # or a model: "model:K" (1-based), its file name or stem
UNET = "unet"
SHOW = 5


class BaseNotFoundError(ModelMergerError):
    """No base was given and none of the registered bases fits the models."""


@dataclass
class CrossMergeRequest:
    """What to merge. Component choices: ``"delta"`` (merge by differences), ``"base"`` or a model
    (``"model:K"``, 1-based, or its file name). ``text_encoders`` overrides ``text_encoder`` per encoder
    (``{"clip_g": "base"}``, names as in the architecture: clip_l, clip_g, t5xxl)."""

    models: Sequence[str]
    base: Optional[str] = None
    combine: str = "ties"
    weights: Optional[Sequence[float]] = None
    scale: float = 1.0
    density: float = 0.2  # ties
    drop: float = 0.5  # dare
    text_encoder: str = "delta"
    text_encoders: Mapping[str, str] = field(default_factory=dict)
    vae: str = "base"
    unet: str = "delta"
    scale_blocks: Optional[object] = None  # a block spec for L per block (see merger_core.merge.blockweights)
    dtype: str = "fp16"
    device: str = "cpu"
    seed: int = 0
    candidate_bases: Optional[Sequence[str]] = None  # for the automatic choice; default: the registered bases
    title: Optional[str] = None
    loras: Sequence[Tuple[str, float, float]] = ()  # LoRAs baked into the result: (path, strength_model, strength_clip)
    threads: int = 0  # CPU merge workers (MergePlan.threads; 0: the default); not recorded: the bytes never depend on it


@dataclass
class CrossPlan:
    plan: MergePlan
    base: str
    base_reason: str
    arch_id: str
    arch_name: str
    components: Dict[str, str]  # component -> what is done with it, in words
    notes: List[str]
    ranking: List[Tuple[str, float]] = field(default_factory=list)  # (base path, score; lower is closer)

    def describe(self) -> str:
        lines = [f"architecture: {self.arch_name}", f"base: {os.path.basename(self.base)} ({self.base_reason})"]
        for comp, what in self.components.items():
            lines.append(f"  {comp}: {what}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Structure


@dataclass
class _Struct:
    path: str
    name: str
    det: object  # analyze Detection
    header: object
    fp: object  # Fingerprint used for components and blocks (detected, or matched by key names)
    recognised: bool


def _structure(path: str) -> _Struct:
    from ..arch import detect_header, get_fingerprint

    header = read_header(path)
    det = detect_header(header, read_probe=False)
    fp = get_fingerprint(det.arch_id) if det.arch_id != "unknown" else _fingerprint_by_names(header.tensors)
    return _Struct(path, os.path.basename(path), det, header, fp, det.arch_id != "unknown")


def _fingerprint_by_names(tensors) -> Optional[object]:
    """For a file whose structure is not recognised: the fingerprint whose component prefixes name the most keys
    (names only; used to tell text encoders and VAE apart, never to claim an architecture)."""
    from ..arch import load_fingerprints

    keys = list(tensors)
    best, best_n = None, 0
    for fp in load_fingerprints().values():
        n = 0
        for c in fp.components.values():
            if c.name != UNET:
                n += sum(1 for k in keys if k.startswith(tuple(c.prefixes)))
        if n > best_n:
            best, best_n = fp, n
    return best


def _arch_label(s: _Struct) -> str:
    if s.recognised:
        v = f", {s.det.variant}" if s.det.variant and s.det.variant != "normal" else ""
        return f"{s.det.arch_name}{v}"
    return "an unrecognised architecture"


def _example_difference(a: _Struct, b: _Struct) -> str:
    ta, tb = a.header.tensors, b.header.tensors
    for k in sorted(set(ta) & set(tb)):
        if ta[k].shape != tb[k].shape and ta[k].is_float:
            return f"{k} is {list(ta[k].shape)} in {a.name} and {list(tb[k].shape)} in {b.name}"
    only_a = sorted(set(ta) - set(tb))
    only_b = sorted(set(tb) - set(ta))
    parts = []
    if only_a:
        parts.append(f"{len(only_a)} of {a.name}'s tensors do not exist in {b.name} (e.g. {only_a[0]})")
    if only_b:
        parts.append(f"{len(only_b)} of {b.name}'s tensors do not exist in {a.name} (e.g. {only_b[0]})")
    return "; ".join(parts) or "their tensors differ"


def _refuse_different(a: _Struct, b: _Struct) -> None:
    raise IncompatibleModelsError(
        f"cannot cross-merge {a.name} ({_arch_label(a)}) with {b.name} ({_arch_label(b)}).\n"
        "A cross-merge adds each model's difference from a common base (M - base) to that base; a difference exists "
        "only between files with the same tensors, and these two architectures are built differently: "
        f"{_example_difference(a, b)}. No tensor of one has a counterpart in the other to subtract, so there is no "
        "delta to transfer. Cross-merge only models of one architecture, with a base of that architecture "
        "(to combine different architectures, use them side by side in a workflow instead)."
    )


def _same_structure(a: _Struct, b: _Struct) -> bool:
    if a.recognised and b.recognised:
        return a.det.arch_id == b.det.arch_id and a.det.variant == b.det.variant
    if a.recognised != b.recognised:
        return False
    ta, tb = a.header.tensors, b.header.tensors
    common = set(ta) & set(tb)
    if not common or any(ta[k].shape != tb[k].shape for k in common):
        return False
    return a.fp is b.fp or (a.fp is not None and b.fp is not None and a.fp.id == b.fp.id)


def check_structures(structs: Sequence[_Struct]) -> None:
    """Refuse any pair that is not of one architecture (header facts only)."""
    first = structs[0]
    for s in structs[1:]:
        if not _same_structure(first, s):
            _refuse_different(first, s)


# ---------------------------------------------------------------------------------------------------------------
# Base choice


def _rank(model: str, bases: Sequence[str]) -> List[Tuple[str, float]]:
    """(base, score) best first, lower score = closer. Uses Analyze Structure's lineage ranking."""
    from .. import arch as analyze

    rank_bases = getattr(analyze, "rank_bases", None)
    if rank_bases is None:
        from ..arch import lineage

        rank_bases = lineage.rank_bases
    ranked = rank_bases(model, list(bases))
    out = []
    for r in ranked:
        if isinstance(r, (tuple, list)):
            out.append((os.fspath(r[0]), float(r[1])))
        else:
            path = getattr(r, "path", None) or getattr(r, "base", None)
            score = next(
                (getattr(r, a) for a in ("distance", "score", "relative_l2", "rel_l2", "delta") if hasattr(r, a)), None
            )
            out.append((os.fspath(path), float(score)))
    return out


def choose_base(models: Sequence[_Struct], candidates: Optional[Sequence[str]] = None) -> Tuple[str, str, List[Tuple[str, float]]]:
    """Pick the base the models' lineage points to. Returns (path, reason, ranking)."""
    first = models[0]
    arch = first.det.arch_id
    label = _arch_label(first)
    if candidates is None:
        from ..identity.bases import list_bases

        entries = [b for b in list_bases() if b.exists and not b.problem]
        cand = [b.path for b in entries if b.arch_id == arch]
    else:
        cand = [os.path.abspath(c) for c in candidates]
    fitting = []
    for c in cand:
        try:
            s = _structure(c)
        except ModelMergerError:
            continue
        if _same_structure(first, s):
            fitting.append(c)
    if not fitting:
        needed = _needed_base(first)
        raise BaseNotFoundError(
            f"no base model for {label} is registered, and a cross-merge needs the models' common base: {needed}. "
            "Register it with `model-merger bases add FILE` (or fetch it with `model-merger bases download "
            "VERSION_ID|URL`, or put it in the bases folder), or name it with --base FILE."
        )
    if len(fitting) == 1:
        return fitting[0], f"the only registered base of {label}", []
    totals: Dict[str, float] = {c: 0.0 for c in fitting}
    per_model: Dict[str, List[float]] = {c: [] for c in fitting}
    for m in models:
        ranked = _rank(m.path, fitting)
        for path, score in ranked:
            key = next((c for c in fitting if os.path.realpath(c) == os.path.realpath(path)), None)
            if key is not None:
                totals[key] += score
                per_model[key].append(score)
    order = sorted(fitting, key=lambda c: totals[c])
    best = order[0]
    scores = ", ".join(f"{s:.4g}" for s in per_model[best])
    runner = order[1]
    reason = (
        f"chosen by lineage among {len(fitting)} registered {label} bases: the models' differences from it are the "
        f"smallest (relative distance {scores}; next best {os.path.basename(runner)}: "
        + ", ".join(f"{s:.4g}" for s in per_model[runner])
        + ")"
    )
    return best, reason, [(c, totals[c]) for c in order]


def _needed_base(s: _Struct) -> str:
    claimed = getattr(s.det, "claimed_family", None)
    if s.recognised:
        base = s.fp.name
        extra = f" (metadata says {claimed})" if claimed else ""
        return f"the {base} checkpoint (or whichever model these were fine-tuned from{extra})"
    return "the checkpoint these models were fine-tuned from"


# ---------------------------------------------------------------------------------------------------------------
# Components


def _component_of(s: _Struct, key: str) -> Optional[str]:
    if s.fp is None:
        return UNET if key.startswith("model.diffusion_model.") else None
    return s.fp.component_of(key, s.det.unet_prefix or "model.diffusion_model.")


def _resolve_choice(choice: Union[str, int], what: str, models: Sequence[_Struct]) -> Union[str, int]:
    """'delta' | 'base' | model index (0-based)."""
    if isinstance(choice, int) and not isinstance(choice, bool):
        if 0 <= choice < len(models):
            return choice
        raise ManifestError(f"{what}: model {choice} does not exist (there are {len(models)} models)")
    c = str(choice).strip()
    low = c.lower()
    if low in COMPONENT_CHOICES:
        return low
    k = low[6:] if low.startswith("model:") else (low[5:] if low.startswith("model") and low[5:].isdigit() else None)
    if k is not None and k.strip().isdigit():
        i = int(k) - 1
        if 0 <= i < len(models):
            return i
        raise ManifestError(f"{what}: model:{k} does not exist (models are numbered 1 to {len(models)})")
    for i, m in enumerate(models):
        if c in (m.name, os.path.splitext(m.name)[0], m.path):
            return i
    raise ManifestError(
        f"{what}: {choice!r} is not one of delta, base, model:K (1..{len(models)}) or a model's file name"
    )


def _short(comp: str) -> str:
    return comp.split(".", 1)[1] if comp.startswith("text_encoder.") else comp


# ---------------------------------------------------------------------------------------------------------------
# Planning


def plan_cross_merge(req: CrossMergeRequest) -> CrossPlan:
    """Check structure, choose the base and build the engine plan; reads headers only."""
    if len(req.models) < 1:
        raise ManifestError("a cross-merge needs at least one model besides the base")
    if req.combine not in COMBINE_METHODS:
        raise ManifestError(f"combine must be one of {', '.join(COMBINE_METHODS)}, got {req.combine!r}")
    weights = list(req.weights) if req.weights is not None else [1.0] * len(req.models)
    if len(weights) != len(req.models):
        raise ManifestError(f"{len(weights)} weights for {len(req.models)} models")
    paths = [os.path.abspath(os.fspath(p)) for p in req.models]
    if len(set(map(os.path.realpath, paths))) != len(paths):
        raise ManifestError("the same model file is given twice")
    models = [_structure(p) for p in paths]
    check_structures(models)
    ranking: List[Tuple[str, float]] = []
    if req.base:
        base_path = os.path.abspath(os.fspath(req.base))
        reason = "given"
    else:
        base_path, reason, ranking = choose_base(models, req.candidate_bases)
    if os.path.realpath(base_path) in map(os.path.realpath, paths):
        raise ManifestError(f"{os.path.basename(base_path)} is both the base and one of the models")
    base = _structure(base_path)
    check_structures([models[0], base])
    notes: List[str] = []
    first = models[0]
    arch_id = first.det.arch_id if first.recognised else (first.fp.id if first.fp is not None else "unknown")
    arch_name = _arch_label(first)
    if not first.recognised:
        notes.append(
            "the structure matches no known architecture; the files are merged because their key names and shapes "
            "agree" + (f", with components named as in {first.fp.name}" if first.fp is not None else "")
        )

    # choices per component
    te_default = _resolve_choice(req.text_encoder, "text encoder", models)
    te_over = {}
    for name, ch in (req.text_encoders or {}).items():
        te_over[str(name).replace("text_encoder.", "")] = _resolve_choice(ch, f"text encoder {name}", models)
    vae_choice = _resolve_choice(req.vae, "VAE", models)
    unet_choice = _resolve_choice(req.unet, "diffusion model", models)
    known_te = {_short(c) for c in (first.fp.components if first.fp is not None else {}) if c.startswith("text_encoder.")}
    for name in te_over:
        if name not in known_te:
            raise ManifestError(f"text encoder {name!r}: this architecture's text encoders are {', '.join(sorted(known_te)) or 'none'}")

    def choice_for(comp: Optional[str]):
        if comp == UNET:
            return unet_choice
        if comp is not None and comp.startswith("text_encoder."):
            return te_over.get(_short(comp), te_default)
        if comp == "vae":
            return vae_choice
        return "base"  # keys outside every component (markers, leftovers) follow the base

    headers = [base.header] + [m.header for m in models]
    names = [base.name] + [m.name for m in models]
    all_keys = sorted({k for h in headers for k in h.tensors})
    source: Dict[str, int] = {}
    comp_keys: Dict[str, int] = {}
    comp_choice: Dict[str, object] = {}
    problems: List[str] = []
    for key in all_keys:
        comp = _component_of(first, key) or "other"
        ch = choice_for(None if comp == "other" else comp)
        comp_keys[comp] = comp_keys.get(comp, 0) + 1
        comp_choice[comp] = ch
        have = [i for i, h in enumerate(headers) if key in h.tensors]
        if ch == "delta":
            if len(have) == len(headers):
                continue  # merged by differences
            if 0 not in have:
                problems.append(f"{key} ({comp}): not in the base, so it has no difference to take")
            else:
                lacking = [names[i] for i in range(len(headers)) if i not in have]
                problems.append(f"{key} ({comp}): missing from {', '.join(lacking)}")
            continue
        want = 0 if ch == "base" else ch + 1
        if want in have:
            source[key] = want
        elif comp == "other" and have:
            source[key] = have[0]
            if len(have) < len(headers):
                notes.append(f"{key}: only in {names[have[0]]}; taken from it")
        else:
            problems.append(f"{key} ({comp}): taken from {names[want]}, which does not have it")
    if problems:
        more = f" and {len(problems) - SHOW} more" if len(problems) > SHOW else ""
        raise IncompatibleModelsError(
            "the cross-merge cannot be planned:\n  " + "\n  ".join(problems[:SHOW]) + more
            + "\n(take the component from the base or one model, e.g. --vae base, --text-encoder base)"
        )
    components: Dict[str, str] = {}
    for comp in sorted(comp_keys, key=lambda c: (c != UNET, c)):
        ch = comp_choice[comp]
        what = {"delta": f"merged by differences ({req.combine})", "base": "from the base"}.get(ch) if isinstance(ch, str) else f"from {names[ch + 1]}"
        components[comp] = f"{what}, {comp_keys[comp]} tensors"

    method = COMBINE_METHODS[req.combine]
    params: Dict[str, object] = {"scale": float(req.scale)}
    if req.combine == "ties":
        params["density"] = float(req.density)
    if req.combine == "dare":
        params["drop"] = float(req.drop)
    from ..methods import get_method

    m = get_method(method)
    params = m.check_params(params)
    key_params = None
    if req.scale_blocks is not None:
        if arch_id == "unknown":
            raise ManifestError("per-block scale needs a recognised architecture (its block map)")
        from .blockweights import key_params_hook

        key_params = key_params_hook(arch_id, {"scale": req.scale_blocks}, m)

    def key_source(key: str) -> Optional[int]:
        return source.get(key)

    inputs = [MergeInput(base_path, 1.0, name=base.name)] + [
        MergeInput(p, float(w), name=s.name) for p, w, s in zip(paths, weights, models)
    ]
    recipe = {
        "cross_merge": {
            "base": base.name,
            "base_reason": reason,
            "combine": req.combine,
            "scale": float(req.scale),
            "components": components,
            **({"scale_blocks": req.scale_blocks} if isinstance(req.scale_blocks, (str, list, dict)) else {}),
        }
    }
    plan = MergePlan(
        inputs=inputs,
        method=method,
        params=params,
        normalize=False,
        dtype=req.dtype,
        device=req.device,
        allow_missing=True,  # every key's sources were checked above
        seed=req.seed,
        title=req.title,
        key_params=key_params,
        key_source=key_source,
        recipe=recipe,
        headers=headers,  # shapes are checked by prepare(), on these headers (read once)
        replay={"planner": "cross_merge", "args": _replay_args(req, len(paths))},
        loras=[LoraInput(os.fspath(p), float(sm), float(sc)) for p, sm, sc in (req.loras or ())],
        threads=max(0, int(req.threads or 0)),
    )
    return CrossPlan(plan, base_path, reason, arch_id, arch_name, components, notes, ranking)


def _replay_args(req: CrossMergeRequest, n: int) -> Dict[str, object]:
    """The request as `model-merger verify` rebuilds it: the base is input 0, the models inputs 1..n."""
    import dataclasses

    args = {f.name: getattr(req, f.name) for f in dataclasses.fields(req) if f.name != "threads"}  # speed only
    args["models"] = list(range(1, n + 1))
    args["base"] = 0
    args["candidate_bases"] = None
    args["weights"] = list(req.weights) if req.weights is not None else None
    args["text_encoders"] = dict(req.text_encoders or {})
    args["loras"] = [[j, float(sm), float(sc)] for j, (_, sm, sc) in enumerate(req.loras or ())]  # by index
    return json.loads(json.dumps(args, default=str))


def cross_merge_to_file(
    req: CrossMergeRequest,
    output: str,
    *,
    overwrite: bool = False,
    progress: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
) -> Tuple[CrossPlan, MergeResult]:
    cp = plan_cross_merge(req)
    prep = prepare(cp.plan)
    result = merge_to_file(cp.plan, output, overwrite=overwrite, progress=progress, cancel=cancel, prepared=prep)
    return cp, result


def cross_merge_to_state_dict(
    req: CrossMergeRequest,
    *,
    progress: Optional[Callable] = None,
    cancel: Optional[Callable[[], bool]] = None,
):
    cp = plan_cross_merge(req)
    sd, result = merge_to_state_dict(cp.plan, progress=progress, cancel=cancel)
    return cp, sd, result
