"""Cross-lineage merge: synthetic families written here (a base plus known deltas per model), base choice,
architecture refusal before any weight is read, text-encoder and VAE choices, the CLI and `bases`."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from merger_core.identity import bases as B
from merger_core.merge import cross as X
from synth import layout_from_fingerprint, write_sparse
from merger_core.merge.cross import CrossMergeRequest, cross_merge_to_file, cross_merge_to_state_dict, plan_cross_merge
from merger_core.merge.runner import _key_seed
from merger_core.errors import BadFileError, IncompatibleModelsError, ManifestError
from merger_core.methods.dare import keep_mask
from merger_core.io.safetensors import read_header

UNET = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer."
VAE = "first_stage_model."


def sdxl_small_layout():
    """SDXL key names (two text encoders) with tiny shapes: a structure no fingerprint claims."""
    lay = {}
    for i, blk in enumerate(["input_blocks.0.0", "input_blocks.4.1.proj_in", "middle_block.1.proj_in",
                             "output_blocks.2.1.proj_in", "out.2", "label_emb.0.0", "time_embed.0"]):
        lay[UNET + blk + ".weight"] = ("F16", (8 + i, 6))
        lay[UNET + blk + ".bias"] = ("F16", (8 + i,))
    lay["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"] = ("F16", (40, 12))
    lay["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = ("I64", (1, 77))
    lay["conditioner.embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight"] = ("F16", (24, 12))
    lay["conditioner.embedders.1.model.token_embedding.weight"] = ("F16", (40, 16))
    lay["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"] = ("F16", (48, 16))
    lay[VAE + "encoder.conv_in.weight"] = ("F16", (8, 3, 3, 3))
    lay[VAE + "decoder.conv_out.bias"] = ("F16", (3,))
    return lay


def make_family(folder, n_models, layout=None, seed=0, delta_scale=0.05, base_seeds=(None,), drop=()):
    """Write bases and n models (= chosen base + delta_i). Returns (base paths, model paths, base tensors, deltas)."""
    os.makedirs(folder, exist_ok=True)
    layout = layout or helpers.small_layout()
    g = torch.Generator().manual_seed(seed)

    def rand(dtype, shape, scale=1.0):
        if dtype == "I64":
            return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
        return (torch.randn(shape, generator=g) * scale).half()

    bases = []
    base_paths = []
    for j, _ in enumerate(base_seeds):
        t = {k: rand(d, s) for k, (d, s) in layout.items()}
        bases.append(t)
        base_paths.append(str(folder / f"base{j}.safetensors"))
        save_file(t, base_paths[-1])
    base = bases[-1]
    deltas = []
    model_paths = []
    for i in range(n_models):
        d = {k: (rand(dt, s, delta_scale).double() if dt != "I64" else None) for k, (dt, s) in layout.items()}
        m = {k: (base[k] if d[k] is None else (base[k].double() + d[k]).half()) for k in layout}
        for k in drop:
            m.pop(k, None)
        # the true delta is what the fp16 files hold
        deltas.append({k: (m[k].double() - base[k].double()) for k in m if m[k].is_floating_point()})
        model_paths.append(str(folder / f"model{i}.safetensors"))
        save_file(m, model_paths[-1])
    return base_paths, model_paths, base, deltas


def fp16_tolerance(ref):
    """Half an fp16 ulp of the reference, plus fp32 arithmetic slack."""
    a = ref.abs().clamp_min(2.0 ** -14)
    ulp = torch.exp2(torch.floor(torch.log2(a)) - 10)
    return 0.5 * ulp + 1e-6 * (1 + ref.abs())


def assert_fp16_close(got, ref, key):
    got = got.double()
    err = (got - ref).abs()
    bad = err > fp16_tolerance(ref)
    assert not bad.any(), f"{key}: {int(bad.sum())} elements beyond fp16 rounding, max error {err.max().item()}"


def ties_ref(ds, w, density, n):
    count = min(n, math.ceil(density * n - 1e-9))
    trimmed = []
    for d in ds:
        d = d.reshape(-1)
        if count <= 0:
            trimmed.append(torch.zeros_like(d))
            continue
        thr = torch.sort(d.abs(), descending=True).values[count - 1]
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    vote = sum(wi * t for wi, t in zip(w, trimmed))
    el = torch.sign(vote)
    num = sum(torch.where((torch.sign(t) == el) & (t != 0), wi * t, torch.zeros_like(t)) for wi, t in zip(w, trimmed))
    den = sum(torch.where((torch.sign(t) == el) & (t != 0), torch.full_like(t, wi), torch.zeros_like(t)) for wi, t in zip(w, trimmed))
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))


def combine_ref(combine, key, deltas, w, params, seed, shape):
    ds = [d[key] for d in deltas]
    n = ds[0].numel()
    if combine == "sum":
        return sum(wi * d for wi, d in zip(w, ds))
    if combine == "ties":
        return ties_ref(ds, w, params["density"], n).reshape(shape)
    if combine == "dare":
        p = params["drop"]
        ks = _key_seed(seed, key)
        return sum(wi * d * keep_mask(ks, i + 1, 0, n, p).reshape(shape).double() / (1 - p) for i, (wi, d) in enumerate(zip(w, ds)))
    raise AssertionError(combine)


# ------------------------------------------------------------------------------------------------------- formula


@pytest.mark.parametrize("combine", ["sum", "ties", "dare"])
@pytest.mark.parametrize("n_models", [2, 3])
def test_result_is_base_plus_scaled_combined_deltas(tmp_path, combine, n_models):
    base_paths, models, base, deltas = make_family(tmp_path, n_models, seed=n_models)
    w = [1.0, 0.5, 0.75][:n_models]
    req = CrossMergeRequest(models, base=base_paths[0], combine=combine, weights=w, scale=0.8, density=0.4, drop=0.3,
                            seed=9, text_encoder="delta", vae="delta")
    before = helpers.hashes(models + base_paths)
    cp, res = cross_merge_to_file(req, str(tmp_path / "out.safetensors"))
    out = load_file(str(tmp_path / "out.safetensors"))
    assert helpers.hashes(models + base_paths) == before
    params = {"density": 0.4, "drop": 0.3}
    for k, t in base.items():
        if not t.is_floating_point():
            assert torch.equal(out[k], t)
            continue
        ref = t.double() + 0.8 * combine_ref(combine, k, deltas, w, params, 9, t.shape)
        assert_fp16_close(out[k], ref, k)
    meta = read_header(str(tmp_path / "out.safetensors")).metadata
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["cross_merge"]["combine"] == combine and recipe["cross_merge"]["base"] == "base0.safetensors"


def test_identical_models_with_sum_and_half_scale_equal_the_model(tmp_path):
    base_paths, models, base, deltas = make_family(tmp_path, 1)
    m = load_file(models[0])
    save_file(m, str(tmp_path / "copy.safetensors"))
    sd = cross_merge_to_state_dict(CrossMergeRequest([models[0], str(tmp_path / "copy.safetensors")], base=base_paths[0],
                                                     combine="sum", scale=0.5, vae="delta"))[1]
    for k, t in m.items():
        assert torch.equal(sd[k], t), k


def test_dare_reruns_identical(tmp_path):
    base_paths, models, _, _ = make_family(tmp_path, 2)
    outs = []
    for i in range(2):
        p = tmp_path / f"o{i}.safetensors"
        cross_merge_to_file(CrossMergeRequest(models, base=base_paths[0], combine="dare", seed=3), str(p))
        outs.append(helpers.data_sha256(p))
    assert outs[0] == outs[1]


# ------------------------------------------------------------------------------------------------------- components


def _component(key):
    if key.startswith(VAE):
        return "vae"
    if key.startswith(SD1_TE):
        return "te"
    return "unet"


def test_default_components_te_by_delta_vae_from_base(tmp_path):
    base_paths, models, base, deltas = make_family(tmp_path, 2)
    cp, sd, _ = cross_merge_to_state_dict(CrossMergeRequest(models, base=base_paths[0], combine="sum", scale=0.5))
    for k, t in base.items():
        if _component(k) == "vae":
            assert torch.equal(sd[k], t), k
        elif t.is_floating_point():
            assert_fp16_close(sd[k], t.double() + 0.5 * (deltas[0][k] + deltas[1][k]), k)
    assert "from the base" in cp.components["vae"]
    assert "differences" in cp.components["unet"]
    assert "differences" in cp.components["text_encoder.clip_l"]


@pytest.mark.parametrize("te,vae,te_src,vae_src", [("base", "model:2", "base", 1), ("model:1", "base", 0, "base"),
                                                   ("model1.safetensors", "model:1", 1, 0)])
def test_text_encoder_and_vae_choices(tmp_path, te, vae, te_src, vae_src):
    base_paths, models, base, deltas = make_family(tmp_path, 2)
    ms = [load_file(p) for p in models]
    _, sd, _ = cross_merge_to_state_dict(CrossMergeRequest(models, base=base_paths[0], combine="ties", text_encoder=te, vae=vae))
    for k, t in base.items():
        comp = _component(k)
        src = te_src if comp == "te" else vae_src if comp == "vae" else None
        if src is None:
            continue
        want = t if src == "base" else ms[src][k]
        assert torch.equal(sd[k], want), (k, src)


def test_sdxl_names_per_encoder_choice(tmp_path):
    base_paths, models, base, deltas = make_family(tmp_path, 2, layout=sdxl_small_layout())
    ms = [load_file(p) for p in models]
    cp, sd, _ = cross_merge_to_state_dict(CrossMergeRequest(
        models, base=base_paths[0], combine="sum", scale=0.5, text_encoder="delta", text_encoders={"clip_g": "model:2"}))
    for k, t in base.items():
        if not t.is_floating_point():
            assert torch.equal(sd[k], t)
        elif k.startswith("conditioner.embedders.1."):
            assert torch.equal(sd[k], ms[1][k]), k
        elif k.startswith(VAE):
            assert torch.equal(sd[k], t), k
        else:  # unet and clip_l by differences
            assert_fp16_close(sd[k], t.double() + 0.5 * (deltas[0][k] + deltas[1][k]), k)
    assert "model1.safetensors" in cp.components["text_encoder.clip_g"]
    with pytest.raises(ManifestError, match="t5xxl"):
        plan_cross_merge(CrossMergeRequest(models, base=base_paths[0], text_encoders={"t5xxl": "base"}))


def test_bad_choice_is_refused_with_the_options(tmp_path):
    base_paths, models, _, _ = make_family(tmp_path, 2)
    with pytest.raises(ManifestError, match="model:K"):
        plan_cross_merge(CrossMergeRequest(models, base=base_paths[0], vae="pony"))
    with pytest.raises(ManifestError, match="model:3 does not exist"):
        plan_cross_merge(CrossMergeRequest(models, base=base_paths[0], text_encoder="model:3"))


def test_model_without_vae_merges_with_vae_from_base_and_refuses_vae_delta(tmp_path):
    lay = helpers.small_layout()
    vae_keys = [k for k in lay if k.startswith(VAE)]
    base_paths, models, base, deltas = make_family(tmp_path, 2, drop=vae_keys)
    _, sd, _ = cross_merge_to_state_dict(CrossMergeRequest(models, base=base_paths[0], combine="sum", vae="base"))
    for k in vae_keys:
        assert torch.equal(sd[k], base[k])
    with pytest.raises(IncompatibleModelsError, match="missing from model0.safetensors"):
        plan_cross_merge(CrossMergeRequest(models, base=base_paths[0], vae="delta"))


def test_scale_per_block(tmp_path):
    base_paths, models, base, deltas = make_family(tmp_path, 2, layout=sdxl_small_layout())
    _, sd, _ = cross_merge_to_state_dict(CrossMergeRequest(
        models, base=base_paths[0], combine="sum", scale=0.5, scale_blocks="*=0.5,OUT=0,IN=1"))
    for k, t in base.items():
        if not k.startswith(UNET):
            continue
        rel = k[len(UNET):]
        L = 0.0 if rel.startswith(("output_blocks", "out.")) else 1.0 if rel.startswith(("input_blocks", "label_emb", "time_embed")) else 0.5
        assert_fp16_close(sd[k], t.double() + L * (deltas[0][k] + deltas[1][k]), k)


# ------------------------------------------------------------------------------------------------------- structure


def _no_weight_reads(monkeypatch):
    import safetensors

    from merger_core.merge import runner as engine

    def boom(*a, **k):
        raise AssertionError("a weight was read")

    monkeypatch.setattr(engine, "open_inputs", boom)
    monkeypatch.setattr(safetensors, "safe_open", boom)
    monkeypatch.setattr(torch, "load", boom)


def test_sd15_with_sdxl_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    sd1 = tmp_path / "sd15.safetensors"
    xl = tmp_path / "sdxl.safetensors"
    xl_base = tmp_path / "sdxl_base.safetensors"
    write_sparse(sd1, layout_from_fingerprint("sd1"))
    write_sparse(xl, layout_from_fingerprint("sdxl_base"))
    write_sparse(xl_base, layout_from_fingerprint("sdxl_base"))
    _no_weight_reads(monkeypatch)
    with pytest.raises(IncompatibleModelsError) as e:
        cross_merge_to_file(CrossMergeRequest([str(sd1), str(xl)], base=str(xl_base)), str(tmp_path / "o.safetensors"))
    msg = str(e.value)
    assert "SD" in msg and "sd15.safetensors" in msg and "sdxl.safetensors" in msg
    assert "no difference" in msg or "no delta" in msg
    assert not os.path.exists(tmp_path / "o.safetensors")
    # a base of the other architecture is refused the same way
    with pytest.raises(IncompatibleModelsError, match="sdxl_base.safetensors"):
        plan_cross_merge(CrossMergeRequest([str(sd1)], base=str(xl_base)))


def test_inpainting_with_normal_is_refused(tmp_path, monkeypatch):
    spec = layout_from_fingerprint("sdxl_base")
    k = UNET + "input_blocks.0.0.weight"
    d, s = spec[k]
    write_sparse(tmp_path / "a.safetensors", spec)
    write_sparse(tmp_path / "b.safetensors", spec)
    spec[k] = (d, (s[0], 9) + s[2:])
    write_sparse(tmp_path / "inpaint.safetensors", spec)
    _no_weight_reads(monkeypatch)
    with pytest.raises(IncompatibleModelsError, match="input_blocks.0.0.weight"):
        plan_cross_merge(CrossMergeRequest([str(tmp_path / "a.safetensors"), str(tmp_path / "inpaint.safetensors")],
                                           base=str(tmp_path / "b.safetensors")))


def test_recognised_sdxl_plan_components(tmp_path):
    for n in ("base", "m1", "m2"):
        write_sparse(tmp_path / f"{n}.safetensors", layout_from_fingerprint("sdxl_base"))
    cp = plan_cross_merge(CrossMergeRequest([str(tmp_path / "m1.safetensors"), str(tmp_path / "m2.safetensors")],
                                            base=str(tmp_path / "base.safetensors"), text_encoders={"clip_l": "base"},
                                            scale_blocks="GRAD_V"))
    assert cp.arch_id == "sdxl_base"
    assert set(cp.components) == {"unet", "text_encoder.clip_l", "text_encoder.clip_g", "vae"}
    assert "from the base" in cp.components["text_encoder.clip_l"]
    assert "differences" in cp.components["text_encoder.clip_g"]
    assert cp.plan.key_source("conditioner.embedders.0.transformer.synthetic_filler.weight") == 0
    assert cp.plan.key_source("conditioner.embedders.1.model.synthetic_filler.weight") is None
    assert cp.plan.key_params(UNET + "output_blocks.8.synthetic.bias") == {"scale": 1.0}
    assert cp.plan.key_params(UNET + "input_blocks.0.0.weight") == {"scale": 0.0}


# ------------------------------------------------------------------------------------------------------- bases


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MODEL_MERGER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODEL_MERGER_BASES_DIR", str(tmp_path / "bases"))
    return tmp_path


def test_automatic_base_choice_picks_the_true_base_among_three(home):
    folder = home / "bases"
    base_paths, models, _, _ = make_family(folder, 2, base_seeds=(1, 2, 3), delta_scale=0.05)
    # the models derive from the last base written; rename so the true base is not last alphabetically
    true = folder / "base2.safetensors"
    os.replace(true, folder / "a_true.safetensors")
    for i, m in enumerate(models):
        os.replace(m, home / f"m{i}.safetensors")
    models = [str(home / f"m{i}.safetensors") for i in range(2)]
    cp = plan_cross_merge(CrossMergeRequest(models))
    assert os.path.basename(cp.base) == "a_true.safetensors"
    assert "lineage" in cp.base_reason and "3" in cp.base_reason
    assert [os.path.basename(p) for p, _ in cp.ranking][0] == "a_true.safetensors"


def test_no_registered_base_names_the_base_needed(home):
    for n in ("m1", "m2"):
        write_sparse(home / f"{n}.safetensors", layout_from_fingerprint("sdxl_base"))
    with pytest.raises(X.BaseNotFoundError) as e:
        plan_cross_merge(CrossMergeRequest([str(home / "m1.safetensors"), str(home / "m2.safetensors")]))
    assert "SDXL" in str(e.value) and "bases add" in str(e.value)


def test_bases_add_list_remove_and_registry_choice(home):
    write_sparse(home / "sdxl_base.safetensors", layout_from_fingerprint("sdxl_base"))
    write_sparse(home / "sd15.safetensors", layout_from_fingerprint("sd1"))
    (home / "junk.safetensors").write_bytes(b"not a safetensors file")
    e = B.add_base(str(home / "sdxl_base.safetensors"), name="sdxl")
    assert e.arch_id == "sdxl_base" and e.source == "registered"
    B.add_base(str(home / "sd15.safetensors"))
    with pytest.raises(BadFileError):
        B.add_base(str(home / "junk.safetensors"))
    names = {b.name: b for b in B.list_bases()}
    assert names["sdxl"].arch_id == "sdxl_base" and names["sd15"].arch_id == "sd1"
    for n in ("m1", "m2"):
        write_sparse(home / f"{n}.safetensors", layout_from_fingerprint("sdxl_base"))
    cp = plan_cross_merge(CrossMergeRequest([str(home / "m1.safetensors"), str(home / "m2.safetensors")]))
    assert cp.base == str(home / "sdxl_base.safetensors")
    assert "only registered base" in cp.base_reason
    B.remove_base("sdxl")
    assert "sdxl" not in {b.name for b in B.list_bases()}
    assert os.path.exists(home / "sdxl_base.safetensors")
    with pytest.raises(ManifestError):
        B.remove_base("sdxl")


def test_bases_download_from_the_local_stub(home):
    from civitai_stub import CivitaiStub, make_version

    import hashlib

    small = home / "small.safetensors"
    helpers.write_model(small)
    data = small.read_bytes()
    sha = hashlib.sha256(data).hexdigest().upper()
    with CivitaiStub() as stub:
        stub.add_version(make_version(4242, 99, sha, file_name="sd15-base.safetensors"))
        stub.add_file(4242, "sd15-base.safetensors", data)
        e = B.download_base("4242", base_url=stub.base_url)
    assert os.path.dirname(e.path) == str(home / "bases")
    assert helpers.sha256_file(e.path).upper() == sha
    assert e.name in {b.name for b in B.list_bases()}


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_cross_merge_and_train_diff(tmp_path, capsys):
    from merger_core.cli import cross_merge as cli_x
    from merger_core.cli import train_diff as cli_t
    import argparse

    base_paths, models, base, deltas = make_family(tmp_path, 2)
    p = argparse.ArgumentParser()
    cli_x.add_arguments(p)
    out = tmp_path / "x.safetensors"
    args = p.parse_args(models + ["--base", base_paths[0], "--combine", "sum", "--weights", "1,0.5", "--scale", "0.5",
                                  "-o", str(out), "--no-progress", "--vae", "model:1"])
    assert cli_x.run(args) == 0
    got = load_file(str(out))
    m0 = load_file(models[0])
    for k, t in base.items():
        if k.startswith(VAE):
            assert torch.equal(got[k], m0[k])
        elif t.is_floating_point():
            assert_fp16_close(got[k], t.double() + 0.5 * (deltas[0][k] + 0.5 * deltas[1][k]), k)
    assert "base0.safetensors (given)" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    cli_t.add_arguments(p)
    out2 = tmp_path / "t.safetensors"
    args = p.parse_args([models[0], models[1], base_paths[0], "-o", str(out2), "--alpha", "0.5", "--no-progress", "--dtype", "fp32"])
    assert cli_t.run(args) == 0
    got = load_file(str(out2))
    m1 = load_file(models[1])
    from merger_core.methods.train_difference import train_difference

    for k, t in base.items():
        if t.is_floating_point():
            ref = train_difference(m0[k].double(), m1[k].double(), t.double(), 0.5)
            assert (got[k].double() - ref).abs().max().item() < 1e-5


def test_cli_bases_and_dry_run(home, capsys):
    from merger_core.cli import main

    write_sparse(home / "sdxl_base.safetensors", layout_from_fingerprint("sdxl_base"))
    for n in ("m1", "m2"):
        write_sparse(home / f"{n}.safetensors", layout_from_fingerprint("sdxl_base"))
    assert main(["bases", "add", str(home / "sdxl_base.safetensors"), "--name", "xl"]) == 0
    assert main(["bases", "list", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert [b["name"] for b in doc["bases"]] == ["xl"] and doc["bases"][0]["arch_id"] == "sdxl_base"
    assert main(["cross-merge", str(home / "m1.safetensors"), str(home / "m2.safetensors"), "--dry-run"]) == 0
    cap = capsys.readouterr()
    assert "sdxl_base.safetensors (the only registered base" in cap.err and "dry run" in cap.out
    assert main(["cross-merge", str(home / "m1.safetensors"), "--dry-run", "--vae", "nope"]) == 2
    assert "model:K" in capsys.readouterr().err
    assert main(["bases", "remove", "xl"]) == 0
