"""Model adapters: any denoiser as a `Denoiser` (module, call, schedule, training target, conditioning).

    from_lafq_unet(model)                      the project's own U-Net, unchanged
    from_diffusers(model, scheduler, ...)      a diffusers model already in memory
    load_diffusers(path_or_repo, ...)          `from_pretrained` of a local folder or a Hub repo
    capture_conditioning(model, run)           the conditioning inputs of one real call, to replay
    save_conditioning / load_conditioning      ... kept in a .safetensors file (what `fisher --images --conditioning` reads)

Fisher maps (lafq.fisher), quantization (lafq.quantize) and sampling take a Denoiser, so they do not
depend on which architecture runs.
"""
from .base import (
           PREDICTION_TYPES,
           Conditioning,
           Denoiser,
           capture_conditioning,
           load_conditioning,
           save_conditioning,
)
from .diffusers_models import from_diffusers, load_diffusers, schedule_of, with_class_conditioning
from .lafq_unet import from_lafq_unet

__all__ = ["PREDICTION_TYPES", "Conditioning", "Denoiser", "capture_conditioning", "from_diffusers", "from_lafq_unet",
           "load_conditioning", "load_diffusers", "save_conditioning", "schedule_of", "with_class_conditioning"]
