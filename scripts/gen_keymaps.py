#!/usr/bin/env python3
"""Generate ``merger_core/data/keymaps/*.json``: the key layouts of each architecture, as data.

Each keymap lists, per component (``unet``, ``text_encoder.clip_l``, ``vae``, ...), the namings a file may use for
it (a file prefix, the canonical prefix it stands for, and for diffusers UNets a block map) and the whole-file
layouts a merge can write. The canonical names are those of a ComfyUI/LDM full checkpoint
(``model.diffusion_model.``, ``cond_stage_model.``, ``first_stage_model.`` ...).

The diffusers UNet block maps follow from rules (below) applied to the UNet keys of the reference layouts
(``--layouts``, default ``../shared/layouts``): ``down_blocks.{i}.resnets.{j}`` is ``input_blocks.{3i+j+1}.0``, and so
on. ``--check-comfyui DIR`` compares every generated name with ComfyUI's own ``comfy.utils.unet_to_diffusers`` (run it
with ComfyUI's Python); nothing of ComfyUI is copied, the data is derived from the layouts.

    python scripts/gen_keymaps.py [--layouts DIR] [--check-comfyui /path/to/ComfyUI]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "merger_core", "data", "keymaps")
UNET = "model.diffusion_model."
NRB = 2  # residual blocks per level: every SD1/SD2/SDXL UNet

RESNET_INNER = [  # diffusers name inside a ResnetBlock2D -> LDM name inside a ResBlock
    ["norm1.", "in_layers.0."],
    ["conv1.", "in_layers.2."],
    ["time_emb_proj.", "emb_layers.1."],
    ["norm2.", "out_layers.0."],
    ["conv2.", "out_layers.3."],
    ["conv_shortcut.", "skip_connection."],
]
BASIC = [  # diffusers prefix -> LDM prefix, for the UNet's top-level layers
    ["time_embedding.linear_1.", "time_embed.0."],
    ["time_embedding.linear_2.", "time_embed.2."],
    ["add_embedding.linear_1.", "label_emb.0.0."],
    ["add_embedding.linear_2.", "label_emb.0.2."],
    ["class_embedding.linear_1.", "label_emb.0.0."],  # read only: ComfyUI's name; diffusers' SDXL has add_embedding
    ["class_embedding.linear_2.", "label_emb.0.2."],
    ["conv_in.", "input_blocks.0.0."],
    ["conv_norm_out.", "out.0."],
    ["conv_out.", "out.2."],
]

VAE_DIFFUSERS_REFUSAL = (
    "its VAE uses diffusers names (vae.encoder.down_blocks...), whose attention weights are Linear matrices where a "
    "checkpoint has 1x1 convolutions: converting needs a reshape, not only a rename. Load the file in ComfyUI "
    "(or diffusers) and save it as a checkpoint (CheckpointSave), or merge a checkpoint without this VAE"
)
CLIP_G_HF_REFUSAL = (
    "its OpenCLIP-G text encoder uses transformers names (separate q_proj/k_proj/v_proj), where an {arch} checkpoint "
    "stores one fused in_proj tensor per layer: converting needs a concatenation, not only a rename. Re-save the "
    "model as a checkpoint in ComfyUI (CheckpointSave) first"
)
OPENCLIP_HF_REFUSAL = (
    "its OpenCLIP-H text encoder uses transformers names (separate q_proj/k_proj/v_proj), where an SD2 checkpoint "
    "stores one fused in_proj tensor per layer: converting needs a concatenation, not only a rename. Re-save the "
    "model as a checkpoint in ComfyUI (CheckpointSave) first"
)


def _unet_keys(layout: dict) -> List[str]:
    return sorted(k[len(UNET):] for k in layout["tensors"] if k.startswith(UNET))


def _roots(rels: List[str]) -> List[str]:
    return sorted({r.split(".", 1)[0] for r in rels})


def _diffusers_blocks(rels: List[str]) -> List[List[object]]:
    """[diffusers prefix, LDM prefix, inner map name or None] for every block of the UNet keys ``rels``."""
    out: Dict[str, Tuple[str, object]] = {}
    for d, l in BASIC:
        if any(r.startswith(l) for r in rels):
            out[d] = (l, None)
    for r in rels:
        p = r.split(".")
        if p[0] == "input_blocks" and p[1] != "0":
            n, m = int(p[1]), int(p[2])
            level, j = divmod(n - 1, NRB + 1)
            if j == NRB:  # input_blocks.{3(i+1)}.0.op: the downsampler of level i
                out[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{n}.0.op.", None)
            elif m == 0:
                out[f"down_blocks.{level}.resnets.{j}."] = (f"input_blocks.{n}.0.", "resnet")
            else:
                out[f"down_blocks.{level}.attentions.{j}."] = (f"input_blocks.{n}.1.", None)
        elif p[0] == "middle_block":
            m = int(p[1])
            if m == 1:
                out["mid_block.attentions.0."] = ("middle_block.1.", None)
            else:
                out[f"mid_block.resnets.{m // 2}."] = (f"middle_block.{m}.", "resnet")
        elif p[0] == "output_blocks":
            n, m = int(p[1]), int(p[2])
            level, j = divmod(n, NRB + 1)
            if m == 0:
                out[f"up_blocks.{level}.resnets.{j}."] = (f"output_blocks.{n}.0.", "resnet")
            elif p[3] == "conv":  # the upsampler sits after the attention where the level has one
                out[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{n}.{m}.conv.", None)
            else:
                out[f"up_blocks.{level}.attentions.{j}."] = (f"output_blocks.{n}.1.", None)
    return [[d, l, inner] for d, (l, inner) in sorted(out.items())]


def diffusers_name(rel: str, blocks: List[List[object]]) -> str:
    """The diffusers name of LDM UNet key ``rel`` under ``blocks`` (the same rule the engine applies)."""
    best = max((b for b in blocks if rel.startswith(b[1])), key=lambda b: (len(b[1]), b[0].startswith("add_")))
    rest = rel[len(best[1]):]
    if best[2] == "resnet":
        for d, l in RESNET_INNER:
            if rest.startswith(l):
                rest = d + rest[len(l):]
                break
    return best[0] + rest


def _naming(id_, name, prefix, canonical, **kw) -> dict:
    d = {"id": id_, "name": name, "prefix": prefix, "canonical": canonical}
    d.update(kw)
    return d


def _sd_keymap(id_, archs, title, layout, te: dict, extra_layouts=()) -> dict:
    rels = _unet_keys(layout)
    unet = [
        _naming("ldm", "model.diffusion_model. (ComfyUI/LDM)", UNET, UNET),
        _naming("bare", "bare LDM names (input_blocks...)", "", UNET, roots=_roots(rels)),
        _naming("diffusers", "diffusers UNet2DConditionModel names (down_blocks...)", "", UNET, blocks="diffusers_unet"),
        _naming("diffusers_prefixed", "diffusers UNet names under unet.", "unet.", UNET, blocks="diffusers_unet"),
    ]
    vae = [
        _naming("ldm", "first_stage_model. (LDM)", "first_stage_model.", "first_stage_model."),
        _naming("diffusers", "diffusers AutoencoderKL names under vae.", "vae.", "first_stage_model.",
                pattern=r"^vae\.((encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)|quant_conv|post_quant_conv)",
                refuse=VAE_DIFFUSERS_REFUSAL),
    ]
    namings = {"unet": unet, **te, "vae": vae}
    te_ldm = {c: "ldm" for c in te}
    layouts = [
        {"id": "checkpoint", "name": f"{title} checkpoint (ComfyUI/LDM names)", "namings": {"unet": "ldm", **te_ldm, "vae": "ldm"}},
        {"id": "unet_only", "name": f"{title} UNet only (model.diffusion_model.)", "namings": {"unet": "ldm"}},
        {"id": "bare", "name": f"{title} UNet only, bare LDM names", "namings": {"unet": "bare"}},
        {"id": "diffusers_unet", "name": f"{title} UNet only, diffusers names (diffusion_pytorch_model)", "namings": {"unet": "diffusers"}},
        *extra_layouts,
    ]
    return {
        "id": id_,
        "architectures": archs,
        "canonical": "checkpoint",
        "namings": namings,
        "maps": {"diffusers_unet": {"blocks": _diffusers_blocks(rels), "inner": {"resnet": RESNET_INNER}}},
        "layouts": layouts,
    }


def _clip_l(canonical: str, comfy: bool = True) -> List[dict]:
    roots = ["embeddings", "encoder", "final_layer_norm"]
    out = [
        _naming("ldm", canonical, canonical, canonical),
        _naming("ldm_no_text_model", canonical.replace("text_model.", "") + " without text_model.",
                canonical.replace("text_model.", ""), canonical, roots=roots),
        _naming("transformers", "text_encoder.text_model. (diffusers/kohya)", "text_encoder.text_model.", canonical),
    ]
    if comfy and canonical != "text_encoders.clip_l.transformer.text_model.":
        out.append(_naming("comfyui", "text_encoders.clip_l.transformer.text_model. (ComfyUI)",
                           "text_encoders.clip_l.transformer.text_model.", canonical))
    return out


def build(layout_dir: str) -> Dict[str, dict]:
    def load(name):
        with open(os.path.join(layout_dir, name + ".json"), encoding="utf-8") as f:
            return json.load(f)

    maps: Dict[str, dict] = {}
    sd1_te = {"text_encoder.clip_l": _clip_l("cond_stage_model.transformer.text_model.")}
    maps["sd1"] = _sd_keymap("sd1", ["sd1"], "SD1", load("sd15"), sd1_te, extra_layouts=[
        {"id": "diffusers", "name": "SD1 single file, diffusers names (unet., text_encoder.)",
         "namings": {"unet": "diffusers_prefixed", "text_encoder.clip_l": "transformers"}},
    ])
    sd2_te = {"text_encoder.open_clip_h": [
        _naming("ldm", "cond_stage_model.model. (OpenCLIP)", "cond_stage_model.model.", "cond_stage_model.model."),
        _naming("transformers", "text_encoder. (transformers names)", "text_encoder.", "cond_stage_model.model.",
                pattern=r"^text_encoder\.text_model\.", refuse=OPENCLIP_HF_REFUSAL),
    ]}
    maps["sd2"] = _sd_keymap("sd2", ["sd2"], "SD2", load("sd21_768v"), sd2_te)
    xl_te = {
        "text_encoder.clip_l": _clip_l("conditioner.embedders.0.transformer.text_model."),
        "text_encoder.clip_g": [
            _naming("ldm", "conditioner.embedders.1.model. (OpenCLIP)", "conditioner.embedders.1.model.", "conditioner.embedders.1.model."),
            _naming("transformers", "text_encoder_2. (transformers names)", "text_encoder_2.", "conditioner.embedders.1.model.",
                    refuse=CLIP_G_HF_REFUSAL.format(arch="SDXL")),
            _naming("comfyui", "text_encoders.clip_g. (transformers names)", "text_encoders.clip_g.", "conditioner.embedders.1.model.",
                    refuse=CLIP_G_HF_REFUSAL.format(arch="SDXL")),
        ],
    }
    maps["sdxl_base"] = _sd_keymap("sdxl_base", ["sdxl_base"], "SDXL", load("sdxl_base"), xl_te)
    ref_te = {"text_encoder.clip_g": [
        _naming("ldm", "conditioner.embedders.0.model. (OpenCLIP)", "conditioner.embedders.0.model.", "conditioner.embedders.0.model."),
        _naming("transformers", "text_encoder_2. (transformers names)", "text_encoder_2.", "conditioner.embedders.0.model.",
                refuse=CLIP_G_HF_REFUSAL.format(arch="SDXL refiner")),
    ]}
    maps["sdxl_refiner"] = _sd_keymap("sdxl_refiner", ["sdxl_refiner"], "SDXL refiner", load("sdxl_refiner"), ref_te)

    for id_, archs, title, lay, te, vae_prefix in (
        ("sd3", ["sd3_medium", "sd35_medium", "sd3_large"], "SD3", load("sd3_medium_t5"),
         ["clip_l", "clip_g", "t5xxl"], "first_stage_model."),
        ("flux", ["flux_dev", "flux_schnell"], "FLUX.1", load("flux1_dev"), ["clip_l", "t5xxl"], "vae."),
    ):
        rels = _unet_keys(lay)
        bare_name = "bare BFL names (double_blocks...)" if id_ == "flux" else "bare MMDiT names (joint_blocks...)"
        namings = {"unet": [
            _naming("ldm", "model.diffusion_model. (ComfyUI)", UNET, UNET),
            _naming("bare", bare_name, "", UNET, roots=_roots(rels)),
        ]}
        for c in te:
            p = f"text_encoders.{c}."
            namings[f"text_encoder.{c}"] = [_naming("ldm", p + " (ComfyUI)", p, p)]
        namings["vae"] = [_naming("ldm", vae_prefix + " (ComfyUI)", vae_prefix, vae_prefix)]
        maps[id_] = {
            "id": id_,
            "architectures": archs,
            "canonical": "checkpoint",
            "namings": namings,
            "maps": {},
            "layouts": [
                {"id": "checkpoint", "name": f"{title} checkpoint (ComfyUI names)",
                 "namings": {c: "ldm" for c in namings}},
                {"id": "unet_only", "name": f"{title} diffusion model only (model.diffusion_model.)", "namings": {"unet": "ldm"}},
                {"id": "bare", "name": f"{title} diffusion model only, {bare_name}", "namings": {"unet": "bare"}},
            ],
        }
    for id_, km in maps.items():
        km["_doc"] = (
            "Generated by scripts/gen_keymaps.py; do not edit by hand. Key layouts of " + ", ".join(km["architectures"])
            + ": per component, the namings a file may use (file prefix -> canonical prefix; 'roots': the first name "
            "after the prefix must be one of these; 'pattern': the key must match; 'blocks': a block map in 'maps'; "
            "'refuse': recognised but needs more than a rename), and the whole-file layouts a merge can write."
        )
    return maps


def check_comfyui(comfy_dir: str, layout_dir: str, maps: Dict[str, dict]) -> int:
    sys.path.insert(0, comfy_dir)
    import comfy.utils  # noqa: E402  (ComfyUI's Python only; used to check, nothing is copied)

    bad = 0
    for id_, lay_name in (("sd1", "sd15"), ("sd2", "sd21_768v"), ("sdxl_base", "sdxl_base"), ("sdxl_refiner", "sdxl_refiner")):
        with open(os.path.join(layout_dir, lay_name + ".json"), encoding="utf-8") as f:
            lay = json.load(f)
        ref = {v: k for k, v in comfy.utils.unet_to_diffusers(lay["unet_config"]).items()}  # ldm -> diffusers
        blocks = maps[id_]["maps"]["diffusers_unet"]["blocks"]
        n = 0
        for rel in _unet_keys(lay):
            if rel not in ref:
                continue
            n += 1
            mine = diffusers_name(rel, blocks)
            if mine != ref[rel] and not (rel.startswith("label_emb.") and ref[rel].startswith("class_embedding.")):
                bad += 1
                print(f"{id_}: {rel}: mine {mine}, ComfyUI {ref[rel]}")
        print(f"{id_}: {n} UNet keys checked against comfy.utils.unet_to_diffusers, {len(_unet_keys(lay)) - n} not in its map")
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layouts", default=os.path.join(HERE, "..", "..", "shared", "layouts"))
    ap.add_argument("--check-comfyui", metavar="DIR", default=None)
    args = ap.parse_args(argv)
    maps = build(args.layouts)
    if args.check_comfyui:
        return 1 if check_comfyui(args.check_comfyui, args.layouts, maps) else 0
    os.makedirs(OUT_DIR, exist_ok=True)
    for id_, km in maps.items():
        path = os.path.join(OUT_DIR, id_ + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"_doc": km.pop("_doc"), **km}, f, indent=1)
            f.write("\n")
        print("wrote", os.path.relpath(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
