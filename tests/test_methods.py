"""Merge methods against direct float64 implementations written here, through the engine on real files."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import helpers
from merger_core.merge.plan import MergeInput, MergePlan, prepare
from merger_core.merge.runner import merge_to_file, merge_to_state_dict
from merger_core.errors import IncompatibleModelsError, ManifestError
from merger_core.io.safetensors import read_header
from merger_core.methods import get_method, list_methods
from merger_core.methods.dare import dare_merge, keep_mask
from merger_core.methods.slerp import slerp_merge
from merger_core.methods.ties import ties_merge
from merger_core.methods.train_difference import train_difference

SHAPES = {
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (40, 30),
    "model.diffusion_model.middle_block.0.in_layers.2.weight": (6, 5, 3, 3),
    "model.diffusion_model.out.2.bias": (4,),
    "first_stage_model.encoder.conv_in.weight": (8, 3, 3, 3),
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (77, 16),
}


def grid(shape, g, lo=-64, hi=64):
    """Values on a 1/64 grid: exact in fp16, fp32 and fp64, with many equal magnitudes (ties)."""
    return torch.randint(lo, hi + 1, shape, generator=g).to(torch.float64) / 64


def write(path, tensors, dtype=torch.float16):
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


def family(tmp_path, n_models, seed=0, dtype=torch.float16, zero=False):
    """A base and n models = base + delta_i on the grid; returns paths and the float64 tensors."""
    g = torch.Generator().manual_seed(seed)
    base = {k: grid(s, g) for k, s in SHAPES.items()}
    models = []
    for i in range(n_models):
        models.append({k: v + (0 * v if zero else grid(v.shape, g, -16, 16)) for k, v in base.items()})
    paths = [write(tmp_path / "base.safetensors", base, dtype)]
    paths += [write(tmp_path / f"m{i}.safetensors", m, dtype) for i, m in enumerate(models)]
    return paths, [base] + models


def run(paths, method, params=None, weights=None, dtype="fp32", seed=0, **kw):
    weights = weights or [1.0] * len(paths)
    plan = MergePlan([MergeInput(p, w) for p, w in zip(paths, weights)], method=method, params=params or {},
                     dtype=dtype, seed=seed, **kw)
    out, _ = merge_to_state_dict(plan)
    return out


# ------------------------------------------------------------------------------------------------- references


def ref_ties(base, models, weights, density, scale):
    base = base.double().reshape(-1)
    n = base.numel()
    count = min(n, math.ceil(density * n - 1e-9))
    trimmed = []
    for m in models:
        d = m.double().reshape(-1) - base
        if count <= 0:
            trimmed.append(torch.zeros_like(d))
            continue
        thr = torch.sort(d.abs(), descending=True).values[count - 1]
        trimmed.append(torch.where(d.abs() >= thr, d, torch.zeros_like(d)))
    vote = sum(w * d for w, d in zip(weights, trimmed))
    elected = torch.sign(vote)
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for w, d in zip(weights, trimmed):
        agree = (torch.sign(d) == elected) & (d != 0)
        num += torch.where(agree, w * d, torch.zeros_like(d))
        den += torch.where(agree, torch.full_like(d, w), torch.zeros_like(d))
    merged = torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return base + scale * merged


def ref_train_diff(a, b, c, alpha):
    a, b, c = a.double(), b.double(), c.double()
    out = a.clone().reshape(-1)
    fa, fb, fc = a.reshape(-1), b.reshape(-1), c.reshape(-1)
    for j in range(out.numel()):
        den = abs(fb[j] - fa[j]) + abs(fb[j] - fc[j])
        frac = abs(fb[j] - fa[j]) / den if den != 0 else 0.0
        out[j] = fa[j] + 1.8 * alpha * (fb[j] - fc[j]) * frac
    return out.reshape(a.shape)


def ref_slerp(a, b, t):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return (1 - t) * a + t * b
    cos = float((a @ b) / (na * nb))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    w = math.acos(cos)
    return (math.sin((1 - t) * w) * a + math.sin(t * w) * b) / math.sin(w)


def close(x, ref, tol=1e-6):
    x = x.double().reshape(-1)
    ref = ref.double().reshape(-1)
    err = (x - ref).abs().max().item() if x.numel() else 0.0
    assert err <= tol * (1 + ref.abs().max().item()), f"max error {err}"


# ------------------------------------------------------------------------------------------------- registry


def test_registry_lists_every_method_with_ranges():
    names = set(list_methods())
    assert {"weighted_sum", "add_difference", "train_difference", "task_arithmetic", "ties", "dare", "slerp"} <= names
    for name in names:
        m = get_method(name)
        assert m.kind in ("linear", "tensor")
        for p in m.params:
            assert p.min <= p.default <= p.max
        assert m.memory_note


def test_out_of_range_parameter_is_refused_naming_it():
    with pytest.raises(ManifestError, match="density"):
        get_method("ties").check_params({"density": 1.5})
    with pytest.raises(ManifestError, match="drop"):
        get_method("dare").check_params({"drop": 1.0})
    with pytest.raises(ManifestError, match="takes 3 models"):
        get_method("train_difference").check_inputs(2)


# ------------------------------------------------------------------------------------------------- add difference


@pytest.mark.parametrize("alpha", [0.0, 0.7, -1.0])
def test_add_difference_matches_reference(tmp_path, alpha):
    paths, (a, b, c) = family(tmp_path, 2, seed=3)
    out = run(paths, "add_difference", {"alpha": alpha})
    for k in SHAPES:
        close(out[k], a[k] + alpha * (b[k] - c[k]))


# ------------------------------------------------------------------------------------------------- train difference


def test_train_difference_function_matches_formula_elementwise():
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(500, generator=g, dtype=torch.float64) for _ in range(3))
    a[:50] = b[:50]  # |B - A| = 0: nothing added
    c[50:100] = b[50:100]  # B == C: stays A
    a[100:120] = b[100:120]
    c[100:120] = b[100:120]  # all equal: denominator 0
    for alpha in (0.0, 0.5, 1.0, -1.3):
        got = train_difference(a, b, c, alpha)
        close(got, ref_train_diff(a, b, c, alpha), 1e-12)
        assert torch.equal(got[50:120], a[50:120])


def test_train_difference_through_engine(tmp_path):
    paths, (a, b, c) = family(tmp_path, 2, seed=5)
    out = run(paths, "train_difference", {"alpha": 0.8})
    for k in SHAPES:
        close(out[k], ref_train_diff(a[k], b[k], c[k], 0.8))


def test_train_difference_keys_where_b_equals_c_stay_a(tmp_path):
    g = torch.Generator().manual_seed(9)
    a = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    b = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    paths = [write(tmp_path / f"{n}.safetensors", t) for n, t in (("a", a), ("b", b), ("c", b))]
    out = run(paths, "train_difference", {"alpha": 1.0}, dtype="fp16")
    for k in SHAPES:
        assert torch.equal(out[k], a[k].half())


# ------------------------------------------------------------------------------------------------- task arithmetic


def test_task_arithmetic_matches_reference(tmp_path):
    paths, ts = family(tmp_path, 3, seed=2)
    w = [1.0, 0.5, 1.0, -0.25]
    out = run(paths, "task_arithmetic", {"scale": 0.8}, weights=w)
    for k in SHAPES:
        ref = ts[0][k] + 0.8 * sum(wi * (m[k] - ts[0][k]) for wi, m in zip(w[1:], ts[1:]))
        close(out[k], ref)


# ------------------------------------------------------------------------------------------------- TIES


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("n_models", [1, 2, 3])
def test_ties_matches_reference(tmp_path, density, n_models):
    paths, ts = family(tmp_path, n_models, seed=10 + n_models)
    w = [1.0] + [1.0 + 0.5 * i for i in range(n_models)]
    out = run(paths, "ties", {"density": density, "scale": 0.9}, weights=w)
    for k in SHAPES:
        close(out[k], ref_ties(ts[0][k], [m[k] for m in ts[1:]], w[1:], density, 0.9).reshape(SHAPES[k]))


def test_ties_identical_inputs_give_base_plus_scaled_delta(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {k: grid(s, g) for k, s in SHAPES.items()}
    m = {k: v + grid(v.shape, g, -8, 8) for k, v in base.items()}
    paths = [write(tmp_path / "b.safetensors", base), write(tmp_path / "m1.safetensors", m), write(tmp_path / "m2.safetensors", m)]
    out = run(paths, "ties", {"density": 1.0, "scale": 0.5})
    for k in SHAPES:
        close(out[k], base[k] + 0.5 * (m[k] - base[k]))


def test_ties_zero_deltas_give_the_base(tmp_path):
    paths, ts = family(tmp_path, 2, seed=6, zero=True)
    out = run(paths, "ties", {"density": 0.5}, dtype="fp16")
    for k in SHAPES:
        assert torch.equal(out[k], ts[0][k].half())


def test_ties_all_equal_signs_average_the_deltas():
    g = torch.Generator().manual_seed(8)
    base = torch.randn(1000, generator=g)
    d1 = torch.rand(1000, generator=g) + 0.1
    d2 = torch.rand(1000, generator=g) + 0.1
    got = ties_merge([base, base + d1, base + d2], [1.0, 1.0, 1.0], 1.0, 1.0)
    close(got, base.double() + ((base + d1).double() - base.double() + (base + d2).double() - base.double()) / 2)
    got = ties_merge([base, base - d1, base - d2], [1.0, 1.0, 1.0], 1.0, 1.0)
    close(got, base.double() - (d1.double() + d2.double()) / 2, 1e-6)


def test_ties_opposite_signs_keep_the_stronger_side():
    base = torch.zeros(4)
    m1 = torch.tensor([1.0, -3.0, 2.0, 0.0])
    m2 = torch.tensor([-2.0, 1.0, 2.0, 5.0])
    got = ties_merge([base, m1, m2], [1.0, 1.0, 1.0], 1.0, 1.0)
    assert got.tolist() == [-2.0, -3.0, 2.0, 5.0]


def test_ties_large_key_uses_exact_threshold():
    """Keys above the sampled-bracket size (2^18) take the fast threshold path; it must stay exact."""
    g = torch.Generator().manual_seed(12)
    n = 600_000
    base = (torch.randint(-50, 50, (n,), generator=g) / 32).half()
    ms = [(base.float() + torch.randint(-20, 20, (n,), generator=g) / 32).half() for _ in range(2)]
    for density in (0.01, 0.2, 0.77):
        got = ties_merge([base, *ms], [1, 1, 1], density, 1.0)  # fp16 views, as native inputs
        close(got, ref_ties(base, ms, [1, 1], density, 1.0))


def test_dare_p0_is_task_arithmetic(tmp_path):
    paths, ts = family(tmp_path, 2, seed=7)
    out = run(paths, "dare", {"drop": 0.0, "scale": 0.7}, weights=[1, 1.0, 0.5])
    for k in SHAPES:
        close(out[k], ts[0][k] + 0.7 * ((ts[1][k] - ts[0][k]) + 0.5 * (ts[2][k] - ts[0][k])))


@pytest.mark.parametrize("p", [0.3, 0.9, 0.999])
def test_dare_matches_reference_with_its_masks(p):
    g = torch.Generator().manual_seed(2)
    n = 200_003
    base, m1, m2 = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(3))
    seed = 12345
    got = dare_merge([base.float(), m1.float(), m2.float()], [1, 1.0, 2.0], p, 1.0, seed, [0, 1, 2])
    k1 = keep_mask(seed, 1, 0, n, p)
    k2 = keep_mask(seed, 2, 0, n, p)
    ref = base + (m1 - base) * k1 / (1 - p) + 2.0 * (m2 - base) * k2 / (1 - p)
    close(got, ref, 1e-5)
    kept = k1.double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n) + 1e-6
    assert not torch.equal(k1, k2)


def test_dare_masks_do_not_depend_on_slicing():
    n = 300_000
    whole = keep_mask(77, 1, 0, n, 0.5)
    parts = torch.cat([keep_mask(77, 1, s, min(n, s + 70_001) - s, 0.5) for s in range(0, n, 70_001)])
    assert torch.equal(whole, parts)


def test_dare_reruns_are_byte_identical_and_seed_matters(tmp_path, monkeypatch):
    from merger_core.merge import runner as engine

    monkeypatch.setattr(engine, "CHUNK_ELEMENTS", 256)  # many slices per key
    paths, _ = family(tmp_path, 2, seed=1)
    outs = []
    for i, seed in enumerate((5, 5, 6)):
        plan = MergePlan([MergeInput(p) for p in paths], method="dare", params={"drop": 0.5}, seed=seed)
        out = tmp_path / f"out{i}.safetensors"
        merge_to_file(plan, out)
        outs.append(helpers.data_sha256(out))
    assert outs[0] == outs[1] != outs[2]
    # the sliced engine run equals one whole-key call
    got = load_file(str(tmp_path / "out0.safetensors"))
    from merger_core.merge.runner import _key_seed

    for k in SHAPES:
        ts = [load_file(p)[k].float() for p in paths]
        whole = dare_merge(ts, [1, 1, 1], 0.5, 1.0, _key_seed(5, k), [0, 1, 2])
        assert torch.equal(got[k], whole.reshape(SHAPES[k]).half())


# ------------------------------------------------------------------------------------------------- SLERP


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_reference(tmp_path, t):
    paths, ts = family(tmp_path, 1, seed=11)
    out = run(paths, "slerp", {"t": t})
    for k in SHAPES:
        close(out[k], ref_slerp(ts[0][k], ts[1][k], t))


def test_slerp_parallel_and_zero_vectors_fall_back_to_lerp():
    a = torch.tensor([1.0, 2.0, -3.0])
    for b in (2 * a, -a, torch.zeros(3)):
        close(slerp_merge(a, b, 0.25), 0.75 * a.double() + 0.25 * b.double())


def test_slerp_orthogonal_unit_vectors():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    got = slerp_merge(a, b, 0.5)
    close(got, torch.tensor([math.sqrt(0.5), math.sqrt(0.5)], dtype=torch.float64))
    assert abs(got.norm().item() - 1.0) < 1e-6


def test_slerp_refuses_three_models(tmp_path):
    paths, _ = family(tmp_path, 2)
    with pytest.raises(ManifestError, match="slerp"):
        run(paths, "slerp")


# ------------------------------------------------------------------------------------------------- engine paths


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("dare", {"drop": 0.2}), ("slerp", {"t": 0.4}),
                                           ("train_difference", {}), ("add_difference", {"alpha": 0.5})])
def test_fp16_file_equals_state_dict_and_inputs_untouched(tmp_path, method, params):
    n = 1 if method == "slerp" else 2
    paths, _ = family(tmp_path, n, seed=21)
    before = helpers.hashes(paths)
    plan = MergePlan([MergeInput(p) for p in paths], method=method, params=params, dtype="fp16")
    merge_to_file(plan, tmp_path / "out.safetensors")
    sd, _ = merge_to_state_dict(plan)
    got = load_file(str(tmp_path / "out.safetensors"))
    for k in SHAPES:
        assert torch.equal(got[k], sd[k])
    assert helpers.hashes(paths) == before


from merger_core.merge import blockweights as bw


def test_block_list_forms_and_counts():
    names = bw._blocks("sdxl_base")
    assert len(names) == 21 and len(bw._blocks("sd1")) == 26
    vals = bw.parse_blocks(",".join(str(i / 20) for i in range(21)), "sdxl_base")
    assert vals["BASE"] == 0.0 and vals["M00"] == 0.5 and vals["VAE"] == 1.0
    assert bw.parse_blocks([0.1] * 26, "sd1")["OUT11"] == 0.1
    with pytest.raises(ManifestError, match="take 26 values"):
        bw.parse_blocks("0.1,0.2", "sd1")
    with pytest.raises(ManifestError, match="not a number"):
        bw.parse_blocks("BASE=x", "sd1")


def test_block_pairs_groups_ranges_and_star():
    v = bw.parse_blocks("*=0.5, OUT=1, IN00-IN02=0.1, IN01=0.9, BASE=0", "sdxl_base")
    assert v["IN00"] == 0.1 and v["IN01"] == 0.9 and v["IN03"] == 0.5 and v["OUT05"] == 1 and v["BASE"] == 0
    assert v["VAE"] == 0.5 and v["M00"] == 0.5
    partial = bw.parse_blocks({"M00": 2.0}, "sd1")
    assert partial == {"M00": 2.0}
    with pytest.raises(ManifestError, match="names no block"):
        bw.parse_blocks("IN12=1", "sdxl_base")


def test_block_presets():
    v = bw.parse_blocks("GRAD_V", "sd1")
    assert v["IN00"] == 0.0 and v["OUT11"] == 1.0 and v["BASE"] == 0.0 and 0 < v["M00"] < 1
    v = bw.parse_blocks("in_only", "sdxl_base")
    assert all(v[b] == (1.0 if b.startswith("IN") else 0.0) for b in v)
    assert "GRAD_V" in bw.presets()
    with pytest.raises(ManifestError, match="presets: "):
        bw.parse_blocks("NO_SUCH", "sd1")


def test_key_hook_maps_keys_to_blocks_and_checks_ranges():
    hook = bw.key_params_hook("sd1", {"alpha": "*=0.3,IN04=0.7,BASE=0.1"}, get_method("add_difference"))
    assert hook("model.diffusion_model.input_blocks.4.1.proj_in.weight") == {"alpha": 0.7}
    assert hook("model.diffusion_model.output_blocks.11.0.skip_connection.bias") == {"alpha": 0.3}
    assert hook("cond_stage_model.transformer.text_model.final_layer_norm.weight") == {"alpha": 0.1}
    assert hook("first_stage_model.decoder.conv_out.bias") == {"alpha": 0.1}  # SD1 counts the VAE as BASE
    assert hook("v_pred") == {}
    with pytest.raises(ManifestError, match=r"alpha for M00 must be in"):
        bw.key_params_hook("sd1", {"alpha": "M00=9"}, get_method("add_difference"))
    with pytest.raises(ManifestError, match="no parameter"):
        bw.key_params_hook("sd1", {"beta": "GRAD_V"}, get_method("add_difference"))
    scalar, h = bw.split_block_params({"alpha": "IN_ONLY"}, get_method("train_difference"), "sd1")
    assert scalar == {"alpha": 1.0} and h("model.diffusion_model.middle_block.0.in_layers.0.bias") == {"alpha": 0.0}


def test_block_weights_through_the_engine(tmp_path):
    paths, (a, b, c) = family(tmp_path, 2, seed=13)
    hook = bw.key_params_hook("sd1", {"alpha": "IN_ONLY"}, get_method("add_difference"))
    plan = MergePlan([MergeInput(p) for p in paths], method="add_difference", params={"alpha": 0.5}, dtype="fp32",
                     key_params=hook)
    out, _ = merge_to_state_dict(plan)
    for k in SHAPES:
        alpha = 1.0 if ".input_blocks." in k else 0.0
        close(out[k], a[k] + alpha * (b[k] - c[k]))


def test_train_difference_plan_per_block_needs_a_known_architecture(tmp_path):
    from merger_core.merge.train import plan_train_difference

    paths, _ = family(tmp_path, 2)
    plan = plan_train_difference(*paths, alpha=0.5)
    assert plan.method == "train_difference" and plan.params == {"alpha": 0.5}
    with pytest.raises(ManifestError, match="not recognised"):
        plan_train_difference(*paths, alpha_blocks="GRAD_V")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,params", [("ties", {"density": 0.3}), ("dare", {"drop": 0.4}), ("slerp", {"t": 0.3}),
                                           ("train_difference", {"alpha": 0.7})])
def test_cuda_matches_cpu(tmp_path, method, params):
    paths, _ = family(tmp_path, 1 if method == "slerp" else 2, seed=31)
    outs = {}
    for dev in ("cpu", "cuda"):
        plan = MergePlan([MergeInput(p) for p in paths], method=method, params=params, dtype="fp32", device=dev, seed=4)
        outs[dev], _ = merge_to_state_dict(plan)
    for k in SHAPES:
        close(outs["cuda"][k], outs["cpu"][k].double(), 1e-5)


def test_tensor_methods_work_inside_inference_mode(tmp_path, monkeypatch):
    """ComfyUI runs nodes under torch.inference_mode(); the slice workers must follow it (regression: TIES raised
    "Inplace update to inference tensor outside InferenceMode" from its worker threads)."""
    import torch
    from safetensors.torch import save_file

    from merger_core import MergeInput, MergePlan, merge_to_state_dict

    monkeypatch.setenv("MODEL_MERGER_THREADS", "2")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(300_000, generator=g)
    paths = []
    for i, scale in enumerate([0.0, 0.1, 0.1]):
        p = tmp_path / f"m{i}.safetensors"
        save_file({"k": (base + scale * torch.randn(300_000, generator=g)).half()}, str(p))
        paths.append(str(p))
    plan = MergePlan([MergeInput(p, 1.0) for p in paths], method="ties", normalize=False)
    with torch.inference_mode():
        sd, _ = merge_to_state_dict(plan)
    expected, _ = merge_to_state_dict(plan)
    assert torch.equal(sd["k"], expected["k"])


# ------------------------------------------------------------------------------------------------- typed inputs


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare"])
def test_base_taking_method_refuses_a_key_the_base_lacks(tmp_path, method):
    """Input 0 of a base-taking method is the base: a key it lacks is refused by name (with --allow-missing too),
    never merged with another model shifted into the base's role."""
    key = "model.diffusion_model.out.2.bias"
    base = helpers.write_model(tmp_path / "base.safetensors", seed=1, drop=[key])
    a = helpers.write_model(tmp_path / "a.safetensors", seed=2)
    b = helpers.write_model(tmp_path / "b.safetensors", seed=3)
    plan = helpers.plan_for([base, a, b], method=method, allow_missing=True)
    with pytest.raises(IncompatibleModelsError, match=r"out\.2\.bias: the base \(base\.safetensors\) lacks this key"):
        prepare(plan)


def test_input_kinds_name_the_base_and_the_roles():
    from merger_core.methods import get_method

    assert get_method("ties").input_kinds(3) == ["base", "model", "model"]
    assert get_method("weighted_sum").input_kinds(2) == ["model", "model"]
    assert get_method("add_difference").input_kinds(3) == ["A", "B", "C"]


# ------------------------------------------------------------------------------------------------- fp8 inputs

FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def fp8_family(tmp_path, n_models, fp8, seed=40):
    """A base and models written as fp8 (values about N(0, 1) rounded to fp8); returns paths and the files' values
    widened to float64 (the truth the references start from)."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    tensors = [base] + [{k: v + 0.25 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_models)]
    paths = [write(tmp_path / f"m{i}.safetensors", t, FP8[fp8]) for i, t in enumerate(tensors)]
    loaded = [{k: v.to(torch.float64) for k, v in load_file(p).items()} for p in paths]
    for p in paths:
        assert {t.dtype for t in read_header(p).tensors.values()} == {fp8}
    return paths, loaded


def ref_dare(ts, weights, p, scale, seed, key):
    from merger_core.merge.runner import _key_seed

    base = ts[0][key].reshape(-1)
    acc = torch.zeros_like(base)
    for i in range(1, len(ts)):
        keep = keep_mask(_key_seed(seed, key), i, 0, base.numel(), p).double()
        acc += weights[i] * (ts[i][key].reshape(-1) - base) * keep / (1 - p)
    return base + scale * acc


FP8_CASES = {
    "weighted_sum": (2, {}, lambda ts, k: 0.25 * ts[0][k] + 0.75 * ts[1][k]),
    "add_difference": (2, {"alpha": 0.6}, lambda ts, k: ts[0][k] + 0.6 * (ts[1][k] - ts[2][k])),
    "task_arithmetic": (2, {"scale": 0.8}, lambda ts, k: ts[0][k] + 0.8 * ((ts[1][k] - ts[0][k]) + (ts[2][k] - ts[0][k]))),
    "ties": (2, {"density": 0.4, "scale": 0.9},
             lambda ts, k: ref_ties(ts[0][k], [ts[1][k], ts[2][k]], [1.0, 1.0], 0.4, 0.9)),
    "dare": (2, {"drop": 0.3, "scale": 1.0}, lambda ts, k: ref_dare(ts, [1.0, 1.0, 1.0], 0.3, 1.0, 3, k)),
    "slerp": (1, {"t": 0.3}, lambda ts, k: ref_slerp(ts[0][k], ts[1][k], 0.3)),
    "train_difference": (2, {"alpha": 0.7}, lambda ts, k: ref_train_diff(ts[0][k], ts[1][k], ts[2][k], 0.7)),
}


@pytest.mark.parametrize("fp8", sorted(FP8))
@pytest.mark.parametrize("method", sorted(FP8_CASES))
def test_every_method_merges_fp8_inputs(tmp_path, method, fp8):
    """fp8 inputs are widened to fp32 before any arithmetic (regression: TIES failed with "Promotion for Float8
    Types is not supported"); the result matches float64 arithmetic on the files' fp8 values."""
    n_models, params, reference = FP8_CASES[method]
    paths, ts = fp8_family(tmp_path, n_models, fp8)
    weights = [1.0, 3.0] if method == "weighted_sum" else None
    plan = MergePlan([MergeInput(p, w) for p, w in zip(paths, weights or [1.0] * len(paths))], method=method,
                     params=params, dtype="fp32", seed=3)
    out_file = tmp_path / "out.safetensors"
    merge_to_file(plan, out_file)
    got = load_file(str(out_file))
    mem, _ = merge_to_state_dict(plan)
    for k in SHAPES:
        assert got[k].dtype == torch.float32
        close(got[k], reference(ts, k))
        assert torch.equal(mem[k], got[k]), k


def test_fp8_inputs_kept_as_fp8(tmp_path):
    """dtype keep writes the first model's fp8 dtype: the merged value rounded to fp8."""
    paths, ts = fp8_family(tmp_path, 1, "F8_E4M3")
    out, _ = merge_to_state_dict(MergePlan([MergeInput(p) for p in paths], method="weighted_sum", dtype="keep"))
    for k in SHAPES:
        assert out[k].dtype == torch.float8_e4m3fn
        ref = 0.5 * (ts[0][k] + ts[1][k])
        err = (out[k].double() - ref).abs()
        assert bool((err <= 2.0**-4 * ref.abs() + 2.0**-9).all()), k  # within e4m3's rounding (3 mantissa bits)
