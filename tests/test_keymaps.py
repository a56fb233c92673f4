"""Key layouts users have (issue 12 item 7): bare BFL Flux and ComfyUI-prefixed Flux, UNet-only files next to full
checkpoints, diffusers-named SD UNets, text-encoder prefix variants; merged by canonical name and written in the
first model's layout or a chosen one. Values are checked against the renamed tensors merged by hand."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file

import keylayouts as kl
from merger_core.arch.detect import canonical_names, detect
from merger_core.arch.keymap import load_keymaps
from merger_core.errors import IncompatibleModelsError, ManifestError
from merger_core.io.safetensors import read_header
from merger_core.merge.plan import MergeInput, MergePlan, prepare
from merger_core.merge.runner import merge_to_file
from synth import layout_from_json, write_sparse

UNET = kl.UNET
FLUX_TE = {"text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": ("F16", (3,)),
           "text_encoders.t5xxl.transformer.shared.weight": ("F16", (3, 3)),
           "vae.decoder.conv_in.weight": ("F16", (3, 3, 3, 3))}


def _merge(tmp_path, paths, weights, name="out.safetensors", **kw):
    plan = MergePlan(inputs=[MergeInput(os.fspath(p), w) for p, w in zip(paths, weights)], **kw)
    out = tmp_path / name
    merge_to_file(plan, out)
    return load_file(os.fspath(out)), prepare(plan)


def _weighted(parts):
    """sum of w * x in fp32, cast to fp16: what the engine computes for a weighted sum (up to rounding)."""
    acc = sum(np.float32(w) * x.astype(np.float32) for w, x in parts)
    return acc.astype(np.float16)


def _close(actual, expected, what=""):
    """Equal within one fp16 ulp (the engine's accumulation order may round the last bit the other way)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    ulp = np.spacing(np.abs(expected)).astype(np.float32)
    diff = np.abs(actual.astype(np.float32) - expected.astype(np.float32))
    assert np.all(diff <= ulp), f"{what}: off by up to {float(np.max(diff / ulp)):.1f} ulp"


# -- the data ------------------------------------------------------------------------------------------------------


def test_generated_keymaps_are_current():
    import importlib.util

    kl.shared_doc("sd15")
    spec = importlib.util.spec_from_file_location("gen_keymaps", os.path.join(os.path.dirname(__file__), "..", "scripts", "gen_keymaps.py"))
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    built = gen.build(kl.LAYOUT_DIR)
    for id_, km in built.items():
        with open(os.path.join(gen.OUT_DIR, id_ + ".json"), encoding="utf-8") as f:
            assert json.load(f) == json.loads(json.dumps(km)), f"{id_}.json is stale: run scripts/gen_keymaps.py"


@pytest.mark.parametrize("name,keymap,layout", [
    ("sd15", "sd1", "checkpoint"), ("sd21_768v", "sd2", "checkpoint"), ("sdxl_base", "sdxl_base", "checkpoint"),
    ("sdxl_refiner", "sdxl_refiner", "checkpoint"), ("sd3_medium", "sd3", "checkpoint"),
    ("sd3_medium_t5", "sd3", "checkpoint"), ("flux1_dev", "flux", "unet_only"), ("flux1_dev_bfl", "flux", "bare"),
])
def test_shared_layouts_have_their_layout(tmp_path, name, keymap, layout):
    p = tmp_path / f"{name}.safetensors"
    write_sparse(p, layout_from_json(kl.shared_doc(name)))
    kn = canonical_names(read_header(p))
    assert (kn.keymap, kn.layout) == (keymap, layout), kn.layout_name
    assert kn.renamed == (layout == "bare")
    assert all(c.startswith(UNET) for k, c in kn.names.items() if layout == "bare")


@pytest.mark.parametrize("name,arch,prefix", [("sd15", "sd1", ""), ("sdxl_base", "sdxl_base", ""),
                                              ("sdxl_refiner", "sdxl_refiner", "unet."), ("sd21_768v", "sd2", "unet.")])
def test_diffusers_unet_names_are_detected_full_size(tmp_path, name, arch, prefix):
    km = load_keymaps()[arch if arch != "sd1" else "sd1"]
    dif = km.naming("unet", "diffusers" if not prefix else "diffusers_prefixed")
    spec = kl.rename(layout_from_json(kl.shared_doc(name)), lambda k: dif.to_file(k) if k.startswith(UNET) else None)
    assert any(k.startswith(prefix + "down_blocks.0.resnets.0.conv1.") for k in spec)
    p = tmp_path / "diffusers.safetensors"
    write_sparse(p, spec)
    det = detect(p)
    assert det.arch_id == arch and det.mergeable, det.evidence
    assert det.layout in ("diffusers_unet", "custom") and det.components["unet"].status == "present"
    kn = canonical_names(read_header(p))
    assert sorted(kn.names.values()) == sorted(k for k in layout_from_json(kl.shared_doc(name)) if k.startswith(UNET))


# -- merges --------------------------------------------------------------------------------------------------------


def test_bare_bfl_flux_merges_with_comfyui_prefixed_flux(tmp_path):
    bare = kl.tiny(kl.shared_keys("flux1_dev_bfl"))
    pre = kl.tiny(kl.shared_keys("flux1_dev"))
    assert {UNET + k for k in bare} == set(pre)
    a = kl.write_values(tmp_path / "bare.safetensors", bare, 1)
    b = kl.write_values(tmp_path / "prefixed.safetensors", pre, 2)
    paths = [tmp_path / "bare.safetensors", tmp_path / "prefixed.safetensors"]
    out, prep = _merge(tmp_path, paths, [0.25, 0.75])
    assert set(out) == set(bare)  # the first model's layout: bare BFL keys
    for k in bare:
        _close(out[k], _weighted([(0.25, a[k]), (0.75, b[UNET + k])]), k)
    assert any("merged by canonical" in n for n in prep.notes)
    # the other way round, and a chosen layout
    out2, _ = _merge(tmp_path, paths[::-1], [0.75, 0.25], name="out2.safetensors")
    assert set(out2) == set(pre)
    out3, _ = _merge(tmp_path, paths, [0.25, 0.75], name="out3.safetensors", key_layout="unet_only")
    assert set(out3) == set(pre)
    for k in bare:
        np.testing.assert_array_equal(out3[UNET + k], out[k])


def test_flux_unet_only_with_full_checkpoint_takes_the_other_components(tmp_path):
    bare = kl.tiny(kl.shared_keys("flux1_dev_bfl"))
    full = {**kl.tiny(kl.shared_keys("flux1_dev")), **FLUX_TE}
    a = kl.write_values(tmp_path / "unet.safetensors", bare, 3)
    b = kl.write_values(tmp_path / "full.safetensors", full, 4)
    paths = [tmp_path / "unet.safetensors", tmp_path / "full.safetensors"]
    out, prep = _merge(tmp_path, paths, [0.5, 0.5])
    assert set(out) == set(full)  # the first model lacks TE and VAE: written in the full checkpoint's layout
    for k in bare:
        _close(out[UNET + k], _weighted([(0.5, a[k]), (0.5, b[UNET + k])]), k)
    for k in FLUX_TE:
        np.testing.assert_array_equal(out[k], b[k])  # copied unmerged
    note = next(n for n in prep.notes if "holds only the diffusion model" in n)
    assert "copied unmerged from full.safetensors" in note and "vae" in note
    assert any("written in the key layout of full.safetensors" in n for n in prep.notes)
    # a chosen diffusion-model-only layout leaves the other components out
    out2, prep2 = _merge(tmp_path, paths, [0.5, 0.5], name="bare.safetensors", key_layout="bare")
    assert set(out2) == set(bare)
    assert any("no names for" in n and "vae" in n for n in prep2.notes)


def test_sd1_diffusers_unet_with_ldm_checkpoint(tmp_path):
    full = kl.tiny(kl.shared_keys("sd15"))
    dif = load_keymaps()["sd1"].naming("unet", "diffusers")
    unet = kl.rename(full, lambda k: dif.to_file(k) if k.startswith(UNET) else None)
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in unet
    a = kl.write_values(tmp_path / "diffusers.safetensors", unet, 5)
    b = kl.write_values(tmp_path / "ldm.safetensors", full, 6)
    paths = [tmp_path / "diffusers.safetensors", tmp_path / "ldm.safetensors"]
    out, prep = _merge(tmp_path, paths, [0.3, 0.7])
    assert set(out) == set(full)
    for k, x in a.items():
        ldm = UNET + {v: c for c, v in ((c, dif.to_file(c)) for c in full if c.startswith(UNET))}[k][len(UNET):]
        _close(out[ldm], _weighted([(0.3, x), (0.7, b[ldm])]), k)
    for k in full:
        if not k.startswith(UNET):
            np.testing.assert_array_equal(out[k], b[k])
    # the same merge written as a diffusers UNet
    out2, _ = _merge(tmp_path, paths, [0.3, 0.7], name="dif.safetensors", key_layout="diffusers_unet")
    assert set(out2) == set(unet)
    for k in unet:
        np.testing.assert_array_equal(out2[k], out[UNET + _ldm_rel(dif, k)])


def _ldm_rel(naming, file_key):
    return naming.to_canonical(file_key)[len(UNET):]


@pytest.mark.parametrize("variant", ["conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer.text_model.",
                                     "text_encoder.text_model."])
def test_sdxl_text_encoder_prefix_variants(tmp_path, variant):
    canon = "conditioner.embedders.0.transformer.text_model."
    full = kl.tiny(kl.shared_keys("sdxl_base"))
    other = kl.rename(full, lambda k: variant + k[len(canon):] if k.startswith(canon) else k)
    assert other != full
    a = kl.write_values(tmp_path / "ckpt.safetensors", full, 7)
    b = kl.write_values(tmp_path / "variant.safetensors", other, 8)
    paths = [tmp_path / "ckpt.safetensors", tmp_path / "variant.safetensors"]
    out, prep = _merge(tmp_path, paths, [0.5, 0.5])
    assert set(out) == set(full)
    for k in full:
        if k.startswith(canon) and full[k][0] == "F16":
            _close(out[k], _weighted([(0.5, a[k]), (0.5, b[variant + k[len(canon):]])]), k)
    # written in the variant's layout when it comes first
    out2, _ = _merge(tmp_path, paths[::-1], [0.5, 0.5], name="v.safetensors")
    assert set(out2) == set(other)


def test_a_layout_that_needs_more_than_a_rename_is_refused(tmp_path):
    full = kl.tiny(kl.shared_keys("sdxl_base"))
    g = "conditioner.embedders.1.model."
    hf = kl.rename(full, lambda k: "text_encoder_2.text_model.encoder.layers.0." + k[len(g):] if k.startswith(g) else k)
    kl.write_values(tmp_path / "ckpt.safetensors", full, 1)
    kl.write_values(tmp_path / "hf.safetensors", hf, 2)
    det = detect(tmp_path / "hf.safetensors")
    assert not det.mergeable and "concatenation, not only a rename" in det.refusal
    with pytest.raises(IncompatibleModelsError, match="text_encoder_2.*CheckpointSave"):
        prepare(MergePlan([MergeInput(os.fspath(tmp_path / "ckpt.safetensors")),
                           MergeInput(os.fspath(tmp_path / "hf.safetensors"))], key_layout="checkpoint"))


def test_diffusers_flux_transformer_is_refused_with_a_hint(tmp_path):
    p = tmp_path / "dflux.safetensors"
    write_sparse(p, {"transformer_blocks.0.attn.to_q.weight": ("F16", (3072, 3072)),
                     "single_transformer_blocks.0.proj_out.weight": ("F16", (3072, 15360)),
                     "x_embedder.weight": ("F16", (3072, 64))})
    det = detect(p)
    assert not det.mergeable and "more than a rename" in det.refusal and det.family == "flux"


def test_unknown_key_layout_is_a_clear_error(tmp_path):
    bare = kl.tiny(kl.shared_keys("flux1_dev_bfl"))
    kl.write_values(tmp_path / "a.safetensors", bare, 1)
    kl.write_values(tmp_path / "b.safetensors", {UNET + k: v for k, v in bare.items()}, 2)
    plan = MergePlan([MergeInput(os.fspath(tmp_path / "a.safetensors")), MergeInput(os.fspath(tmp_path / "b.safetensors"))],
                     key_layout="diffusers_unet")
    with pytest.raises(ManifestError, match="no key layout 'diffusers_unet'.*checkpoint, unet_only, bare"):
        prepare(plan)


def test_manifest_and_cli_carry_the_key_layout(tmp_path):
    from merger_core.cli.merge import add_arguments
    from merger_core.manifest.parse import load_manifest, manifest_to_dict
    from merger_core.merge.plan import plan_from_manifest
    import argparse

    bare = kl.tiny(kl.shared_keys("flux1_dev_bfl"))
    kl.write_values(tmp_path / "a.safetensors", bare, 1)
    kl.write_values(tmp_path / "b.safetensors", {UNET + k: v for k, v in bare.items()}, 2)
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"version": 1, "key_layout": "checkpoint",
                             "models": [{"path": "a.safetensors"}, {"path": "b.safetensors"}]}))
    man = load_manifest(m)
    assert man.key_layout == "checkpoint" and manifest_to_dict(man)["key_layout"] == "checkpoint"
    assert plan_from_manifest(man).key_layout == "checkpoint"
    assert plan_from_manifest(man, key_layout="bare").key_layout == "bare"
    ap = argparse.ArgumentParser()
    add_arguments(ap)
    assert ap.parse_args([os.fspath(m), "-o", "x.safetensors", "--key-layout", "bare"]).key_layout == "bare"


def test_files_with_the_same_key_names_are_renamed_once(tmp_path, monkeypatch):
    """Merging N files of one layout maps their key names once, not N times (a plan maps every input; the names
    decide the renaming, the shapes only the structural check after it), with the same answer for each file."""
    from merger_core.arch import keymap

    paths = []
    for i, dtype in enumerate(["F16", "BF16"]):
        layout = {k: (dtype, s) for k, (_, s) in layout_from_json(kl.shared_doc("flux1_dev_bfl")).items()}
        paths.append(tmp_path / f"m{i}.safetensors")
        write_sparse(paths[-1], layout)
    for km in load_keymaps().values():
        km._renames.clear()  # what earlier tests mapped
    calls = []
    real = keymap.Naming.to_canonical
    monkeypatch.setattr(keymap.Naming, "to_canonical", lambda self, key: calls.append(key) or real(self, key))
    first = canonical_names(read_header(paths[0]))
    once = len(calls)
    second = canonical_names(read_header(paths[1]))
    assert once > 0 and len(calls) == once
    assert (second.keymap, second.layout, second.names) == (first.keymap, first.layout, first.names)
    assert second.renamed and second.names is not first.names  # each caller gets its own dict
