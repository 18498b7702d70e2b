"""Tiny diffusers models built locally (no Hub): a few thousand parameters, 8x8 samples.

Each helper saves the model and a DDPMScheduler with `save_pretrained` into a folder laid out like
a pipeline (`unet/` or `transformer/`, `scheduler/`), so tests load them back through the real
`from_pretrained` path.
"""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_unet2d(seed: int = 0):
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(4, 8),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=2, attention_head_dim=4, num_class_embeds=3).eval()


def export_unet2d(seed: int = 0):
    """Unconditional, with 32-wide linear layers so group sizes 32 divide them (~0.1M parameters)."""
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, attention_head_dim=8).eval()


def tiny_unet2d_condition(seed: int = 0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(4, 8),
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=6, attention_head_dim=2, norm_num_groups=2).eval()


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=4, num_layers=1,
                                 sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2).eval()


def tiny_transformer2d(seed: int = 0):
    """The generic Transformer2DModel in its DiT configuration (it takes the timestep third, by name)."""
    import warnings

    from diffusers import Transformer2DModel
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # diffusers points DiT users to DiTTransformer2DModel: this is the other class
        warnings.simplefilter("ignore")
        return Transformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=2, out_channels=4, num_layers=1,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=2,
                                  norm_type="ada_norm_zero").eval()


def tiny_sd3(seed: int = 0):
    """An SD3-style MMDiT (joint attention over text and image tokens, adaLN, patch size 2): ~4k parameters."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=2, num_layers=1, attention_head_dim=4,
                                 num_attention_heads=2, joint_attention_dim=6, caption_projection_dim=8,
                                 pooled_projection_dim=4, out_channels=2, pos_embed_max_size=8).eval()


def flow_scheduler(shift: float = 3.0):
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def scheduler(prediction_type: str = "epsilon", steps: int = 1000):
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=steps, prediction_type=prediction_type)


def save_pipeline_dir(root: Path, model, prediction_type: str = "epsilon", component: str | None = None) -> Path:
    """root/{unet|transformer}/ + root/scheduler/ + a model_index.json naming them."""
    import json
    component = component or ("transformer" if "Transformer" in type(model).__name__ else "unet")
    model.save_pretrained(root / component, safe_serialization=True)
    sched = scheduler(prediction_type)
    sched.save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                       component: ["diffusers", type(model).__name__],
                                                       "scheduler": ["diffusers", type(sched).__name__]}))
    return root


def sd_pipeline(folder: Path) -> Path:
    """A tiny Stable-Diffusion-style folder, offline: unet/ (cross-attention), scheduler/, tokenizer/ (a word-level
    vocabulary) and text_encoder/ (CLIP), with latents.safetensors (4 latents) and captions.txt (one per latent)."""
    import transformers
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    tiny_unet2d_condition().save_pretrained(folder / "unet")
    scheduler().save_pretrained(folder / "scheduler")
    words = ["[PAD]", "[UNK]", "a", "red", "blue", "cat", "dog", "photo"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]",
                                         model_max_length=5).save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(vocab_size=len(words), hidden_size=6, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=5, pad_token_id=0,
                                         bos_token_id=2, eos_token_id=1)
    transformers.CLIPTextModel(config).eval().save_pretrained(folder / "text_encoder")
    latents = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    save_file({"images": latents}, folder / "latents.safetensors")
    (folder / "captions.txt").write_text("a red cat\na blue dog\nphoto of a cat\na dog\n")
    return folder
