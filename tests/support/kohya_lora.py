"""A real kohya-format LoRA (``lora_up``/``lora_down``/``alpha``, diffusers module names as kohya's sd-scripts write
them) for an SD1.5-layout checkpoint, sized from the checkpoint's own header: linear layers, a 1x1 and a 3x3 conv of
the UNet, and text-encoder layers. Used by the node tests (small layout) and the real-ComfyUI host test (full
layout), where ComfyUI's LoraLoader applies the same file."""

from __future__ import annotations

import math
from typing import Dict, Mapping, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model.encoder."

# kohya module name -> checkpoint key (SD1.5 saved layout)
SD15_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": UNET + "input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_0_resnets_0_conv1": UNET + "input_blocks.1.0.in_layers.2.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": UNET + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_out_0": UNET + "output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": TE + "layers.0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_0_mlp_fc1": TE + "layers.0.mlp.fc1.weight",
    "lora_te_text_model_encoder_layers_11_self_attn_out_proj": TE + "layers.11.self_attn.out_proj.weight",
}


def header_shapes(path) -> Dict[str, Tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def write_kohya_lora(path, checkpoint, seed: int = 7, rank: int = 4, alpha: float = 2.0, scale: float = 0.1,
                     modules: Mapping[str, str] = SD15_MODULES, dtype=torch.float16) -> Dict[str, str]:
    """Write the LoRA for the modules whose keys ``checkpoint`` has; returns {module: key} of those written."""
    shapes = header_shapes(checkpoint)
    g = torch.Generator().manual_seed(seed)
    tensors, used = {}, {}
    for name, key in modules.items():
        shape = shapes.get(key)
        if shape is None or len(shape) not in (2, 4):
            continue
        out_f, in_f = shape[0], shape[1]
        r = min(rank, out_f, in_f * (math.prod(shape[2:]) if len(shape) == 4 else 1))
        if len(shape) == 2:
            down = torch.randn(r, in_f, generator=g) * scale
            up = torch.randn(out_f, r, generator=g) * scale
        else:  # conv: down carries the kernel, up is 1x1 (kohya's LoCon / conv LoRA)
            down = torch.randn(r, in_f, *shape[2:], generator=g) * scale
            up = torch.randn(out_f, r, 1, 1, generator=g) * scale
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        used[name] = key
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": "sd_v1"}
    save_file(tensors, str(path), metadata=meta)
    return used


def reference_delta(lora_path, module: str) -> torch.Tensor:
    """The module's delta (strength 1) in float64, from the kohya formula up @ down * alpha / rank."""
    with safe_open(str(lora_path), "pt") as f:
        up = f.get_tensor(f"{module}.lora_up.weight").double()
        down = f.get_tensor(f"{module}.lora_down.weight").double()
        alpha = float(f.get_tensor(f"{module}.alpha"))
    r = down.shape[0]
    d = up.flatten(1) @ down.flatten(1)
    return (d * (alpha / r)).reshape(up.shape[0], *down.shape[1:])
