"""Generate (or check) ``merger_core/data/lora_keys/*.json`` from ComfyUI's own LoRA key mapping.

Run with ComfyUI's Python (it imports ``comfy``)::

    /path/to/ComfyUI/.venv/bin/python scripts/gen_lora_keys.py --comfyui /path/to/ComfyUI [--check]

For each architecture it takes the exact saved key layout (``shared/layouts/*.json``: names, shapes), lets ComfyUI
detect the model config, builds the model on the meta device (no memory), and asks ``comfy.lora.model_lora_keys_unet``
and ``model_lora_keys_clip`` for the map from LoRA names to ComfyUI's internal keys. The internal text-encoder keys
are traced back to the saved keys by running ComfyUI's ``process_clip_state_dict`` on small tensors that carry their
source key and row numbers (so the fused OpenCLIP ``in_proj_weight`` rows and the transposed ``text_projection`` are
found, not assumed). The result is compressed into rules (data), checked by expanding it with
``merger_core.lora.keymap.build_key_map`` and comparing with ComfyUI's map, entry for entry, and written.
``--check`` compares instead of writing and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "merger_core", "data", "lora_keys")

# data file -> (layout file, the saved prefix of the diffusion model, identifying keys)
ARCHS = {
    "sd15": ("sd15.json", "model.diffusion_model.", [
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]),
    "sd21": ("sd21_768v.json", "model.diffusion_model.", [
        "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"]),
    "sdxl_base": ("sdxl_base.json", "model.diffusion_model.", [
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "model.diffusion_model.label_emb.0.0.weight"]),
    "sd3_medium": ("sd3_medium.json", "model.diffusion_model.", [
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"]),
    "flux1_dev": ("flux1_dev.json", "model.diffusion_model.", [
        "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]),
}
LAYER_PATTERN = r"^text_model\.encoder\.layers\.\d+\.(mlp\.fc1|mlp\.fc2|self_attn\.(q|k|v|out)_proj)$"
ROW_CODE = 1 << 17  # id tensors carry source_index * ROW_CODE + row


def layout_dir(args) -> str:
    for cand in (args.layouts, os.environ.get("MODEL_MERGER_LAYOUTS"), "/work/shared/layouts",
                 os.path.join(REPO, "shared", "layouts")):
        if cand and os.path.isdir(cand):
            return cand
    sys.exit("no layout folder found (--layouts)")


def comfy_maps(comfy_dir: str, layout: dict, unet_prefix: str):
    """(unet map, clip map, internal clip key -> (saved key, row0, rows, transposed)) from ComfyUI."""
    sys.path.insert(0, comfy_dir)
    sys.argv = [sys.argv[0], "--cpu"]
    import torch
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.lora
    import comfy.model_detection
    import comfy.utils

    tensors = layout["tensors"]
    # meta tensors (no memory); vectors real, since ComfyUI reads a few of them (SD2's v-prediction probe)
    meta = {k: torch.zeros(v["shape"]) if len(v["shape"]) == 1 else torch.empty(v["shape"], dtype=torch.float16, device="meta")
            for k, v in tensors.items()}
    config = comfy.model_detection.model_config_from_unet(meta, unet_prefix)
    if config is None:
        raise SystemExit(f"ComfyUI does not recognise the layout {layout.get('arch')}")
    with torch.device("meta"):
        model = config.get_model(meta, unet_prefix)
    unet_map = comfy.lora.model_lora_keys_unet(model, {})

    # trace ComfyUI's text-encoder keys back to the saved ones
    names = [k for k in tensors if not k.startswith(unet_prefix) and not k.startswith("first_stage_model.")]
    ids = {}
    for i, k in enumerate(names):
        shape = tensors[k]["shape"]
        if not shape:
            ids[k] = torch.tensor(float(i * ROW_CODE), dtype=torch.float64)
        else:
            ids[k] = (i * ROW_CODE + torch.arange(shape[0], dtype=torch.float64)).reshape(shape[0], 1)
    internal = config.process_clip_state_dict(dict(ids))
    trace = {}
    for ik, t in internal.items():
        if t.ndim == 0:
            continue
        transposed = t.ndim == 2 and t.shape[0] == 1 and t.shape[1] > 1
        v = t.reshape(-1)
        src = int(v[0].item()) // ROW_CODE
        row0 = int(v[0].item()) % ROW_CODE
        assert torch.equal(v, v[0] + torch.arange(v.numel(), dtype=torch.float64)), ik
        key = names[src]
        full = tensors[key]["shape"][0]
        trace[ik] = (key, None if (row0 == 0 and v.numel() == full) else (row0, v.numel()), transposed)

    class FakeClip:  # model_lora_keys_clip reads only the state dict's names
        def state_dict(self):
            return internal

    clip_map = comfy.lora.model_lora_keys_clip(FakeClip(), {})
    return unet_map, clip_map, trace


def target(value, unet_prefix, trace):
    """ComfyUI's map value -> Target data (saved layout) or None (a transform we do not carry)."""
    from merger_core.lora.keymap import Target

    rows = None
    if isinstance(value, tuple):
        key, off = value[0], value[1] if len(value) > 1 else None
        if len(value) > 2 and value[2] is not None:
            return None  # a value function (Flux's norm_out scale/shift swap)
        if off is not None:
            if off[0] != 0:
                return None
            rows = (int(off[1]), int(off[2]))
    else:
        key = value
    if key.startswith("diffusion_model."):
        return Target(unet_prefix + key[len("diffusion_model."):], rows)
    if key in trace:
        saved, r, transposed = trace[key]
        if rows is not None and r is not None:
            rows = (r[0] + rows[0], rows[1])
        return Target(saved, rows or r, transposed)
    return "missing"


def build(arch: str, comfy_dir: str, layouts: str):
    from merger_core.lora.keymap import Target

    layout_file, unet_prefix, detect = ARCHS[arch]
    layout = json.load(open(os.path.join(layouts, layout_file)))
    unet_map, clip_map, trace = comfy_maps(comfy_dir, layout, unet_prefix)
    keys = set(layout["tensors"])
    expected = {}
    skipped = {}
    for alias, value in list(unet_map.items()) + list(clip_map.items()):
        t = target(value, unet_prefix, trace)
        if t is None or t == "missing" or t.key not in keys:
            skipped[alias] = str(value)
            continue
        expected[alias] = t

    import comfy.utils
    # the diffusers-name table of the diffusion model (the one irregular part of it)
    table = {}
    model_is = type(comfy.model_detection.model_config_from_unet(
        {k: __import__("torch").empty(v["shape"], device="meta") for k, v in layout["tensors"].items()}, unet_prefix)).__name__
    if arch in ("sd15", "sd21", "sdxl_base"):
        import comfy.model_detection as md
        cfg = md.detect_unet_config({k: __import__("torch").empty(v["shape"], device="meta") for k, v in layout["tensors"].items()}, unet_prefix)
        for dk, uk in comfy.utils.unet_to_diffusers(cfg).items():
            if dk.endswith(".weight") and unet_prefix + uk in keys:
                table[dk[: -len(".weight")]] = Target(uk).to_data()
        diff_aliases = ["lora_unet_{us}", "lycoris_{us}", "{proc}", "unet.{proc}"]
    else:
        import comfy.model_detection as md
        cfg = md.detect_unet_config({k: __import__("torch").empty(v["shape"], device="meta") for k, v in layout["tensors"].items()}, unet_prefix)
        fn = comfy.utils.mmdit_to_diffusers if arch.startswith("sd3") else comfy.utils.flux_to_diffusers
        for dk, value in fn(cfg, output_prefix="diffusion_model.").items():
            if not dk.endswith(".weight"):
                continue
            t = target(value, "", {})
            if t is None or t == "missing" or unet_prefix + t.key not in keys:
                continue
            table[dk[: -len(".weight")]] = t.to_data()
        diff_aliases = (["transformer.{dot}", "base_model.model.{dot}", "lora_transformer_{us}", "lycoris_{us}"]
                        if arch.startswith("sd3") else ["transformer.{dot}", "lycoris_{us}", "lora_transformer_{us}"])

    # text encoders: group ComfyUI's internal keys by encoder, a prefix rule where the saved names follow one
    encoders = []
    by_enc = {}
    for ik, (saved, rows, transposed) in trace.items():
        if not ik.endswith(".weight"):
            continue
        enc, _, rest = ik.partition(".transformer.")
        by_enc.setdefault(enc, {})[rest[: -len(".weight")]] = (saved, rows, transposed)
    for enc, members in sorted(by_enc.items()):
        prefixes = {}
        for rel, (saved, rows, transposed) in members.items():
            if rows is None and not transposed and saved.endswith(rel + ".weight"):
                prefixes.setdefault(saved[: -len(rel + ".weight")], 0)
                prefixes[saved[: -len(rel + ".weight")]] += 1
        ckpt_prefix = max(prefixes, key=prefixes.get) if prefixes else None
        irregular = {rel: Target(s, r, tr).to_data() for rel, (s, r, tr) in sorted(members.items())
                     if not (ckpt_prefix and r is None and not tr and s == ckpt_prefix + rel + ".weight")}
        encoders.append({"name": enc, "ckpt_prefix": ckpt_prefix, "table": irregular,
                         "all_aliases": [f"text_encoders.{enc}.transformer.{{dot}}"],
                         "layer_pattern": LAYER_PATTERN, "layer_aliases": []})
    doc = {
        "arch": arch,
        "comfyui_model_config": model_is,
        "generated_by": "scripts/gen_lora_keys.py from ComfyUI comfy/lora.py (model_lora_keys_unet, model_lora_keys_clip)",
        "detect": detect,
        "unet": {"prefixes": [unet_prefix], "weight_aliases": ["lora_unet_{us}", "diffusion_model.{dot}"],
                 "other_aliases": ["diffusion_model.{dot}"]},
        "diffusers": {"aliases": diff_aliases, "table": table},
        "text_encoders": encoders,
        "exclude": [],
        "extra": {},
    }
    # the layer aliases each encoder gets: read off ComfyUI's map (lora_te_, lora_te1_, text_encoder., ...)
    for enc in encoders:
        probe = "text_model.encoder.layers.0.mlp.fc1"
        want = None
        if probe in by_enc[enc["name"]]:
            s, r, tr = by_enc[enc["name"]][probe]
            want = Target(s, r, tr)
        if want is None:
            continue
        for alias, t in expected.items():
            if t == want and not alias.startswith("text_encoders."):
                enc["layer_aliases"].append(alias.replace("text_model_encoder_layers_0_mlp_fc1", "{us}").replace(
                    "text_model.encoder.layers.0.mlp.fc1", "{dot}").replace("{us}", "text_model_{us}").replace("text_model_{us}", "{us}"))
        enc["layer_aliases"] = sorted(set(a.replace("{us}", "{us}") for a in enc["layer_aliases"]))
    fix_layer_aliases(doc)
    from merger_core.lora import keymap

    got = expand(doc, keys)
    doc["exclude"] = sorted(a for a in got if a not in expected)
    doc["extra"] = {a: t.to_data() for a, t in sorted(expected.items()) if got.get(a) != t}
    got = expand(doc, keys)
    assert got == expected, "the rules do not reproduce ComfyUI's map"
    doc["comfyui_aliases_without_a_saved_key"] = len(skipped)  # modules this layout does not have
    return doc


def fix_layer_aliases(doc):
    """Layer aliases as templates: 'lora_te1_text_model_encoder_layers_0_mlp_fc1' -> 'lora_te1_{us}'."""
    for enc in doc["text_encoders"]:
        out = []
        for a in enc["layer_aliases"]:
            a = a.replace("text_model_{us}", "{us}")
            a = a.replace("text_model_encoder_layers_0_mlp_fc1", "{us}").replace("text_model.encoder.layers.0.mlp.fc1", "{dot}")
            out.append(a)
        enc["layer_aliases"] = sorted(set(out))


def expand(doc, keys):
    from merger_core.lora import keymap

    keymap.keymap_data.cache_clear()
    orig = keymap.keymap_data
    keymap.keymap_data = lambda arch: doc
    try:
        return keymap.build_key_map(doc["arch"], keys)
    finally:
        keymap.keymap_data = orig


def dump(doc) -> str:
    """One entry per line for the big tables, so that a change shows as a small diff."""
    lines = ["{"]
    items = list(doc.items())
    for i, (k, v) in enumerate(items):
        end = "," if i < len(items) - 1 else ""
        if k == "diffusers":
            tab = v["table"]
            body = ",\n".join(f"    {json.dumps(n)}: {json.dumps(t)}" for n, t in tab.items())
            lines.append(f'  "diffusers": {{"aliases": {json.dumps(v["aliases"])}, "table": {{\n{body}\n  }}}}{end}')
        elif k == "text_encoders":
            encs = []
            for e in v:
                tab = ",\n".join(f"      {json.dumps(n)}: {json.dumps(t)}" for n, t in e["table"].items())
                rest = {x: y for x, y in e.items() if x != "table"}
                encs.append("    " + json.dumps(rest)[:-1] + ', "table": {' + (f"\n{tab}\n    " if tab else "") + "}}")
            lines.append('  "text_encoders": [\n' + ",\n".join(encs) + f"\n  ]{end}")
        elif k in ("extra",) and v:
            body = ",\n".join(f"    {json.dumps(n)}: {json.dumps(t)}" for n, t in v.items())
            lines.append(f'  "{k}": {{\n{body}\n  }}{end}')
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v)}{end}")
    lines.append("}")
    text = "\n".join(lines) + "\n"
    assert json.loads(text) == json.loads(json.dumps(doc))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR"), help="a ComfyUI checkout")
    ap.add_argument("--layouts", default=None, help="folder of the saved key layouts (shared/layouts)")
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    ap.add_argument("--arch", action="append", choices=sorted(ARCHS), help="only these (default: all)")
    args = ap.parse_args(argv)
    if not args.comfyui:
        sys.exit("--comfyui (or COMFYUI_DIR) is needed")
    sys.path.insert(0, REPO)
    layouts = layout_dir(args)
    bad = 0
    for arch in args.arch or sorted(ARCHS):
        doc = build(arch, os.path.abspath(args.comfyui), layouts)
        text = dump(doc)
        path = os.path.join(OUT_DIR, f"{arch}.json")
        if args.check:
            old = open(path, encoding="utf-8").read() if os.path.exists(path) else None
            same = old is not None and json.loads(old) == json.loads(text)
            print(f"{arch}: {'matches' if same else 'DIFFERS from'} ComfyUI's mapping")
            bad += not same
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print(f"{arch}: {len(text):,} bytes, {len(expand(doc, json.load(open(os.path.join(layouts, ARCHS[arch][0])))['tensors'])):,} aliases")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
