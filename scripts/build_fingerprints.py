"""Derive the compact fingerprint files in ``merger_core/data/architectures/`` from full key layouts.

This is a maintainer tool, not used at run time::

    python scripts/build_fingerprints.py [/path/to/shared/layouts]

It reads the full layouts (every key, shape and dtype of a reference file), keeps only what identifies an
architecture (a few dozen signature keys with shapes, block counts, keys that must be absent), the component
prefixes with their expected tensor and parameter counts, and the block map, and writes one JSON per
architecture. Architectures without a reference layout (SD3.5 medium/large, Flux schnell, SD2 512) are derived
here from a verified one by a documented transformation and are marked ``"verified": false``.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from merger_core.io.safetensors import FLOAT_DTYPES  # noqa: E402  (the one dtype table)

UNET = "model.diffusion_model."

# ---------------------------------------------------------------------------------------------------------------
# Hand-written facts: component prefixes, signature patterns, block maps.

UNET_BLOCK_RULES_SD = [
    [r"^(time_embed|label_emb)\.", "IN00"],
    [r"^input_blocks\.(\d+)\.", "IN{0:02d}"],
    [r"^middle_block\.", "M00"],
    [r"^output_blocks\.(\d+)\.", "OUT{0:02d}"],
    [r"^out\.", "OUT{last_out}"],
]
SD3_BLOCK_RULES = [
    [r"^(pos_embed|x_embedder|context_embedder|y_embedder|t_embedder)\b", "EMB"],
    [r"^joint_blocks\.(\d+)\.", "J{0:02d}"],
    [r"^final_layer\.", "FINAL"],
]
FLUX_BLOCK_RULES = [
    [r"^(img_in|time_in|guidance_in|vector_in|txt_in)\.", "EMB"],
    [r"^double_blocks\.(\d+)\.", "D{0:02d}"],
    [r"^single_blocks\.(\d+)\.", "S{0:02d}"],
    [r"^final_layer\.", "FINAL"],
]

# signature patterns (regex over the key relative to the diffusion prefix); matching layout keys become signature
UNET_SIG = [
    r"^time_embed\.0\.weight$",
    r"^time_embed\.2\.weight$",
    r"^label_emb\.0\.0\.weight$",
    r"^input_blocks\.0\.0\.weight$",
    r"^input_blocks\.\d+\.0\.in_layers\.2\.weight$",
    r"^(input|output)_blocks\.\d+\.1\.proj_in\.weight$",
    r"^(input|output|middle)_blocks?(\.\d+)?\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$",
    r"^middle_block\.1\.proj_in\.weight$",
    r"^out\.2\.weight$",
]
SD3_SIG = [
    r"^(pos_embed|x_embedder\.proj\.weight|context_embedder\.weight|y_embedder\.mlp\.0\.weight|t_embedder\.mlp\.0\.weight)$",
    r"^joint_blocks\.0\.(x_block|context_block)\.(attn|attn2)\.(qkv\.weight|ln_q\.weight)$",
    r"^joint_blocks\.0\.x_block\.adaLN_modulation\.1\.weight$",
    r"^joint_blocks\.0\.x_block\.mlp\.fc1\.weight$",
    r"^final_layer\.linear\.weight$",
]
FLUX_SIG = [
    r"^(img_in|txt_in)\.weight$",
    r"^(time_in|vector_in|guidance_in)\.in_layer\.weight$",
    r"^double_blocks\.0\.img_attn\.qkv\.weight$",
    r"^double_blocks\.0\.txt_mlp\.0\.weight$",
    r"^single_blocks\.0\.linear1\.weight$",
    r"^final_layer\.linear\.weight$",
]

VAE_LDM = {"vae": ["first_stage_model."]}

ARCHS = {
    "sd1": dict(
        layout="sd15", name="Stable Diffusion 1.x", family="sd1", prediction="eps", kind="unet",
        components={"text_encoder.clip_l": ["cond_stage_model.transformer."], **VAE_LDM},
        sig=UNET_SIG, counts={"input_blocks.": 12, "output_blocks.": 12},
        absent=["label_emb.0.0.weight"],
        variant={"key": "input_blocks.0.0.weight", "dim": 1, "values": {"4": "normal", "9": "inpaint", "8": "pix2pix"}},
        blocks=["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)],
        unet_rules=UNET_BLOCK_RULES_SD, last_out=11, component_blocks={"text_encoder": "BASE", "vae": "BASE"},
        notes="SD 1.4/1.5 and fine-tunes; CLIP ViT-L/14 text encoder (768-d context).",
    ),
    "sd2": dict(
        layout="sd21_768v", name="Stable Diffusion 2.x", family="sd2", prediction="eps_or_v", kind="unet",
        components={"text_encoder.open_clip_h": ["cond_stage_model.model."], **VAE_LDM},
        sig=UNET_SIG, counts={"input_blocks.": 12, "output_blocks.": 12},
        absent=["label_emb.0.0.weight"],
        variant={"key": "input_blocks.0.0.weight", "dim": 1, "values": {"4": "normal", "9": "inpaint", "8": "pix2pix", "5": "depth"}},
        blocks=["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)],
        unet_rules=UNET_BLOCK_RULES_SD, last_out=11, component_blocks={"text_encoder": "BASE", "vae": "BASE"},
        prediction_probe={"key": "output_blocks.11.1.transformer_blocks.0.norm1.bias", "std_above": 0.09,
                          "then": "v", "else": "eps",
                          "why": "same rule as ComfyUI supported_models.SD20.model_type: the 768-v model's norm1.bias std is > 0.09"},
        notes="SD 2.0/2.1, 512 (epsilon) and 768 (v-prediction) share one structure; OpenCLIP ViT-H text encoder (1024-d context).",
    ),
    "sdxl_base": dict(
        layout="sdxl_base", name="SDXL base", family="sdxl", prediction="eps", kind="unet",
        components={"text_encoder.clip_l": ["conditioner.embedders.0.transformer."], "text_encoder.clip_g": ["conditioner.embedders.1.model."], **VAE_LDM},
        sig=UNET_SIG, counts={"input_blocks.": 9, "output_blocks.": 9}, absent=[],
        variant={"key": "input_blocks.0.0.weight", "dim": 1, "values": {"4": "normal", "9": "inpaint", "8": "pix2pix"}},
        blocks=["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["M00"] + [f"OUT{i:02d}" for i in range(9)] + ["VAE"],
        unet_rules=UNET_BLOCK_RULES_SD, last_out=8, component_blocks={"text_encoder": "BASE", "vae": "VAE"},
        notes="SDXL 1.0 base and every fine-tune of it (Pony, Illustrious, NoobAI, ...): one family structurally.",
    ),
    "sdxl_refiner": dict(
        layout="sdxl_refiner", name="SDXL refiner", family="sdxl_refiner", prediction="eps", kind="unet",
        components={"text_encoder.clip_g": ["conditioner.embedders.0.model."], **VAE_LDM},
        sig=UNET_SIG, counts={"input_blocks.": 12, "output_blocks.": 12}, absent=[],
        variant={"key": "input_blocks.0.0.weight", "dim": 1, "values": {"4": "normal"}},
        blocks=["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["M00"] + [f"OUT{i:02d}" for i in range(12)] + ["VAE"],
        unet_rules=UNET_BLOCK_RULES_SD, last_out=11, component_blocks={"text_encoder": "BASE", "vae": "VAE"},
        notes="SDXL 1.0 refiner: 384 model channels, OpenCLIP bigG only (1280-d context).",
    ),
    "sd3_medium": dict(
        layout="sd3_medium_t5", name="SD3 medium", family="sd3_medium", prediction="flow", kind="mmdit",
        components={"text_encoder.clip_l": ["text_encoders.clip_l."], "text_encoder.clip_g": ["text_encoders.clip_g."],
                    "text_encoder.t5xxl": ["text_encoders.t5xxl."], **VAE_LDM},
        optional=["text_encoder.t5xxl"],
        sig=SD3_SIG, counts={"joint_blocks.": 24},
        absent=["joint_blocks.0.x_block.attn.ln_q.weight", "joint_blocks.0.x_block.attn2.qkv.weight"],
        variant={"key": "x_embedder.proj.weight", "dim": 1, "values": {"16": "normal"}},
        blocks=["BASE", "EMB"] + [f"J{i:02d}" for i in range(24)] + ["FINAL", "VAE"],
        unet_rules=SD3_BLOCK_RULES, component_blocks={"text_encoder": "BASE", "vae": "VAE"},
        notes="SD3 medium (2B MMDiT, 24 joint blocks, hidden 1536); CLIP-L, CLIP-G and optionally T5-XXL.",
    ),
    "flux_dev": dict(
        layout="flux1_dev", name="FLUX.1 dev", family="flux", prediction="flow", kind="flux",
        components={"text_encoder.clip_l": ["text_encoders.clip_l."], "text_encoder.t5xxl": ["text_encoders.t5xxl."], "vae": ["vae."]},
        optional=["text_encoder.clip_l", "text_encoder.t5xxl", "vae"],
        sig=FLUX_SIG, counts={"double_blocks.": 19, "single_blocks.": 38}, absent=[],
        variant={"key": "img_in.weight", "dim": 1, "values": {"64": "normal", "384": "inpaint", "128": "control"}},
        blocks=["BASE", "EMB"] + [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)] + ["FINAL", "VAE"],
        unet_rules=FLUX_BLOCK_RULES, component_blocks={"text_encoder": "BASE", "vae": "VAE"},
        notes="FLUX.1 dev (12B, guidance-distilled: has guidance_in). Fill (inpaint) and depth/canny variants widen img_in.",
    ),
}


def _derive_sd3(src: Dict[str, dict], hidden: int, depth: int, qk_norm: bool, self_attn_layers: int, pos_side: int):
    """SD3-family MMDiT layout with another width/depth, derived from the SD3 medium one (hidden 1536, depth 24)."""
    base_h = 1536
    out: Dict[str, dict] = {}

    def scale(shape):
        return [d // base_h * hidden if d % base_h == 0 and d >= base_h else d for d in shape]

    blk = {}
    for k, v in src.items():
        m = re.match(r"joint_blocks\.(\d+)\.(.*)", k)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            kind = "last" if i == 23 else "mid"
            blk.setdefault(kind, {})[rest] = v
        elif k == "pos_embed":
            out[k] = {"shape": [1, pos_side * pos_side, hidden], "dtype": v["dtype"]}
        else:
            out[k] = {"shape": scale(v["shape"]), "dtype": v["dtype"]}
    head = 64
    for i in range(depth):
        rests = blk["last" if i == depth - 1 else "mid"]
        for rest, v in rests.items():
            shape = scale(v["shape"])
            if i < self_attn_layers and rest.startswith("x_block.adaLN_modulation.1."):
                shape = [9 * hidden] + shape[1:]
            out[f"joint_blocks.{i}.{rest}"] = {"shape": shape, "dtype": v["dtype"]}
        dt = "F16"
        if qk_norm:
            for part in ("x_block", "context_block"):
                for n in ("ln_q", "ln_k"):
                    out[f"joint_blocks.{i}.{part}.attn.{n}.weight"] = {"shape": [head], "dtype": dt}
        if i < self_attn_layers:
            out[f"joint_blocks.{i}.x_block.attn2.qkv.weight"] = {"shape": [3 * hidden, hidden], "dtype": dt}
            out[f"joint_blocks.{i}.x_block.attn2.qkv.bias"] = {"shape": [3 * hidden], "dtype": dt}
            out[f"joint_blocks.{i}.x_block.attn2.proj.weight"] = {"shape": [hidden, hidden], "dtype": dt}
            out[f"joint_blocks.{i}.x_block.attn2.proj.bias"] = {"shape": [hidden], "dtype": dt}
            if qk_norm:
                for n in ("ln_q", "ln_k"):
                    out[f"joint_blocks.{i}.x_block.attn2.{n}.weight"] = {"shape": [head], "dtype": dt}
    return out


def _numel(shape, dtype="F16") -> int:
    """Parameters: elements of floating-point tensors (integer buffers such as position_ids do not count)."""
    return math.prod(shape) if dtype in FLOAT_DTYPES else 0


def _fingerprint(arch_id: str, spec: dict, tensors: Dict[str, dict], verified: bool, source: str) -> dict:
    """tensors: full key -> {shape, dtype} with the UNet under model.diffusion_model."""
    unet = {k[len(UNET):]: v for k, v in tensors.items() if k.startswith(UNET)}
    sig = {}
    for k in sorted(unet):
        if any(re.search(p, k) for p in spec["sig"]):
            sig[k] = unet[k]["shape"]
    comps = {"unet": {"prefixes": [UNET, ""], "tensors": len(unet), "params": sum(_numel(v["shape"], v["dtype"]) for v in unet.values()), "required": True}}
    for name, prefixes in spec["components"].items():
        sel = {k: v for k, v in tensors.items() if any(k.startswith(p) for p in prefixes)}
        comps[name] = {
            "prefixes": prefixes,
            "tensors": len(sel) or None,
            "params": sum(_numel(v["shape"], v["dtype"]) for v in sel.values()) or None,
            "required": name not in spec.get("optional", []),
        }
    rules = []
    for pat, label in spec["unet_rules"]:
        rules.append([pat, label.replace("{last_out}", f"{spec.get('last_out', 0):02d}")])
    # marker / scheduler keys that belong to no component
    return {
        "id": arch_id,
        "name": spec["name"],
        "family": spec["family"],
        "kind": spec["kind"],
        "prediction": spec["prediction"],
        "verified": verified,
        "source": source,
        "notes": spec.get("notes", ""),
        "nominal_dtype": spec.get("nominal_dtype", "F16"),
        "components": comps,
        "signature": sig,
        "counts": spec["counts"],
        "absent": spec.get("absent", []),
        "variant": spec["variant"],
        "prediction_probe": spec.get("prediction_probe"),
        "blocks": spec["blocks"],
        "block_rules": rules,
        "component_blocks": spec["component_blocks"],
    }


def build(layout_dir: str, out_dir: str) -> List[str]:
    layouts = {}
    for f in os.listdir(layout_dir):
        if f.endswith(".json"):
            with open(os.path.join(layout_dir, f)) as fh:
                layouts[f[:-5]] = json.load(fh)
    written = []
    fps = {}
    for arch_id, spec in ARCHS.items():
        lay = layouts[spec["layout"]]
        spec = dict(spec, nominal_dtype=lay.get("nominal_dtype", "F16"))
        fps[arch_id] = _fingerprint(arch_id, spec, lay["tensors"], True,
                                    f"layout {spec['layout']} ({lay.get('title', '')})")
    # ---- derived architectures
    # Flux schnell: the dev transformer without the guidance embedder (BFL's published model has no guidance_in).
    dev = layouts["flux1_dev"]["tensors"]
    schnell = {k: v for k, v in dev.items() if ".guidance_in." not in k}
    spec = dict(ARCHS["flux_dev"], name="FLUX.1 schnell", absent=["guidance_in.in_layer.weight"], nominal_dtype="BF16",
                notes="FLUX.1 schnell (timestep-distilled): the dev structure without guidance_in.")
    spec["sig"] = FLUX_SIG
    fps["flux_schnell"] = _fingerprint("flux_schnell", spec, schnell, False, "derived from flux1_dev minus guidance_in")
    # SD3.5 medium and large from SD3 medium.
    sd3 = layouts["sd3_medium_t5"]["tensors"]
    mmdit = {k[len(UNET):]: v for k, v in sd3.items() if k.startswith(UNET)}
    others = {k: v for k, v in sd3.items() if not k.startswith(UNET)}
    for arch_id, name, hidden, depth, sa, side, note in (
        ("sd35_medium", "SD3.5 medium", 1536, 24, 13, 384,
         "SD3.5 medium (MMDiT-X: 24 joint blocks, hidden 1536, extra self-attention in blocks 0-12, qk RMSNorm, 384x384 pos_embed)."),
        ("sd3_large", "SD3.5 large", 2432, 38, 0, 192,
         "SD3.5 large / large turbo (38 joint blocks, hidden 2432 = 38 x 64, qk RMSNorm)."),
    ):
        derived = _derive_sd3(mmdit, hidden, depth, True, sa, side)
        full = dict(others)
        full.update({UNET + k: v for k, v in derived.items()})
        spec = dict(ARCHS["sd3_medium"], name=name, counts={"joint_blocks.": depth}, absent=[], notes=note,
                    blocks=["BASE", "EMB"] + [f"J{i:02d}" for i in range(depth)] + ["FINAL", "VAE"], nominal_dtype="F16")
        if sa == 0:
            spec["absent"] = ["joint_blocks.0.x_block.attn2.qkv.weight"]
        fps[arch_id] = _fingerprint(arch_id, spec, full, False,
                                    f"derived from sd3_medium: hidden {hidden}, depth {depth}, self-attention layers {sa}, pos_embed {side}x{side}")
        fps[arch_id]["family"] = arch_id
    os.makedirs(out_dir, exist_ok=True)
    for arch_id, fp in fps.items():
        path = os.path.join(out_dir, f"{arch_id}.json")
        with open(path, "w") as fh:
            json.dump(fp, fh, indent=1, sort_keys=False)
            fh.write("\n")
        written.append(path)
    return written


if __name__ == "__main__":
    src = sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "..", "shared", "layouts")
    out = os.path.join(REPO, "merger_core", "data", "architectures")
    for p in build(src, out):
        print(p)
