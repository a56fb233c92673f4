"""Small synthetic LoRA files and checkpoints for the LoRA tests: real safetensors files, tiny tensors."""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch
from safetensors.torch import save_file

SD1_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
SD1_TO_Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
SD1_CONV = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
SD1_TE_Q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
SD1_TE_FC1 = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"

# small SD1-named checkpoint: key -> shape (the key map needs the names; shapes are ours)
SD1_SHAPES = {
    SD1_TO_K: (8, 768),
    SD1_TO_Q: (6, 10),
    SD1_CONV: (6, 4, 3, 3),
    SD1_TE_Q: (6, 5),
    SD1_TE_FC1: (7, 768),
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": (6, 6, 1, 1),
    "model.diffusion_model.out.2.bias": (4,),
}

SDXL_TO_K = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
SDXL_IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
SDXL_TE1_Q = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
SDXL_SHAPES = {
    SDXL_TO_K: (8, 2048),
    SDXL_IN_PROJ: (3840, 1280),  # real rows: the key map names rows 1280..2560 for k_proj
    SDXL_TE1_Q: (6, 5),
    "model.diffusion_model.label_emb.0.0.weight": (4, 6),
    "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (6, 4, 3, 3),
}


def gen(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32)


def save(path, tensors: Mapping[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def checkpoint(path, shapes: Mapping[str, tuple], seed: int = 0, dtype=torch.float16) -> Dict[str, torch.Tensor]:
    r = gen(seed)
    sd = {k: r(*s).to(dtype) for k, s in shapes.items()}
    save(path, sd)
    return sd
