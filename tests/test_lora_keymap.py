"""The LoRA key map (merger_core/lora/keymap.py and data/lora_keys/*.json): the data maps the real saved layouts'
keys, and, with COMFYUI_DIR, it is what ComfyUI's own comfy/lora.py mapping gives, entry for entry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from merger_core.lora.keymap import Target, architectures, arch_of_checkpoint, build_key_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {"sd15": "sd15", "sd21": "sd21_768v", "sdxl_base": "sdxl_base", "sd3_medium": "sd3_medium", "flux1_dev": "flux1_dev"}

EXPECTED = {
    "sd15": {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
            Target("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"),
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0":
            Target("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight"),
        "lora_unet_down_blocks_0_resnets_0_conv1": Target("model.diffusion_model.input_blocks.1.0.in_layers.2.weight"),
        "lora_unet_input_blocks_1_1_proj_in": Target("model.diffusion_model.input_blocks.1.1.proj_in.weight"),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out":
            Target("model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight"),
        "lora_te_text_model_encoder_layers_11_mlp_fc2":
            Target("cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight"),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj":
            Target("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"),
    },
    "sdxl_base": {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
            Target("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"),
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k":
            Target("model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"),
        "lora_te1_text_model_encoder_layers_3_self_attn_q_proj":
            Target("conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight"),
        "lora_te2_text_model_encoder_layers_31_self_attn_v_proj":
            Target("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (2560, 1280)),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1":
            Target("conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"),
        "lora_te2_text_projection": Target("conditioner.embedders.1.model.text_projection", None, True),
    },
    "sd21": {
        "lora_te_text_model_encoder_layers_0_self_attn_k_proj":
            Target("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", (1024, 1024)),
    },
    "sd3_medium": {
        "transformer.transformer_blocks.0.attn.to_k":
            Target("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", (1536, 1536)),
        "lora_transformer_transformer_blocks_3_attn_add_v_proj":
            Target("model.diffusion_model.joint_blocks.3.context_block.attn.qkv.weight", (3072, 1536)),
        "lora_te1_text_model_encoder_layers_0_mlp_fc1":
            Target("text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.weight"),
    },
    "flux1_dev": {
        "lora_unet_double_blocks_0_img_attn_qkv": Target("model.diffusion_model.double_blocks.0.img_attn.qkv.weight"),
        "transformer.single_transformer_blocks.2.attn.to_v":
            Target("model.diffusion_model.single_blocks.2.linear1.weight", (6144, 3072)),
        "transformer.single_transformer_blocks.2.proj_mlp":
            Target("model.diffusion_model.single_blocks.2.linear1.weight", (9216, 12288)),
        "diffusion_model.single_blocks.5.linear1_qkv":
            Target("model.diffusion_model.single_blocks.5.linear1.weight", (0, 9216)),
    },
}


def test_every_architecture_has_a_map():
    assert set(architectures()) == set(LAYOUTS)


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_map_names_real_keys_of_the_saved_layout(arch, shared_layout):
    layout = shared_layout(LAYOUTS[arch])["tensors"]
    assert arch_of_checkpoint(layout) == arch
    km = build_key_map(arch, layout)
    for alias, want in EXPECTED.get(arch, {}).items():
        assert km.get(alias) == want, alias
    for alias, t in km.items():
        shape = layout[t.key]["shape"]
        if t.rows is not None:
            assert 0 <= t.rows[0] and t.rows[0] + t.rows[1] <= shape[0], (alias, t)
    # every linear and conv weight of the diffusion model is reachable by its kohya name
    unet = [k for k, v in layout.items() if k.startswith("model.diffusion_model.") and k.endswith(".weight")
            and len(v["shape"]) in (2, 4)]
    targets = {t.key for t in km.values()}
    assert not [k for k in unet if k not in targets]


def test_a_checkpoint_of_no_known_layout_has_no_map():
    assert arch_of_checkpoint(["model.diffusion_model.foo.weight"]) is None


@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="COMFYUI_DIR is not set")
def test_data_is_comfyuis_mapping():
    comfy = os.environ["COMFYUI_DIR"]
    py = os.environ.get("COMFYUI_PYTHON") or next(
        (p for p in (os.path.join(comfy, ".venv", "bin", "python"), os.path.join(comfy, "venv", "bin", "python"))
         if os.path.exists(p)), sys.executable)
    layouts = os.path.join(REPO, "..", "shared", "layouts")
    args = [py, os.path.join(REPO, "scripts", "gen_lora_keys.py"), "--comfyui", comfy, "--check"]
    if os.path.isdir(layouts):
        args += ["--layouts", layouts]
    res = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("matches") == len(LAYOUTS), res.stdout
