"""Model adapters: any denoiser as a `Denoiser` (module, call, schedule, training target, conditioning).

    load(path_or_repo)                         the one loader: a lafq .safetensors U-Net (FP32 or quantized),
                                               a diffusers folder or Hub id (`lafq.load` is this)

    from_lafq_unet(model)                      the project's own U-Net, unchanged
    from_diffusers(model, scheduler, ...)      a diffusers model already in memory
    load_diffusers(path_or_repo, ...)          `from_pretrained` of a local folder or a Hub repo
    capture_conditioning(model, run)           the conditioning inputs of one real call, to replay
    save_conditioning / load_conditioning      ... kept in a .safetensors file (what `fisher --images --conditioning` reads)
    encode_captions(folder, captions)          a text-to-image pipeline's rows for captions (`fisher --captions`)

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
from .diffusers_models import encode_captions, from_diffusers, load_diffusers, schedule_of, with_class_conditioning
from .lafq_unet import from_lafq_unet

__all__ = ["PREDICTION_TYPES", "Conditioning", "Denoiser", "capture_conditioning", "encode_captions", "from_diffusers", "from_lafq_unet", "load",
           "load_conditioning", "load_diffusers", "save_conditioning", "schedule_of", "with_class_conditioning"]


def load(path_or_repo=None, *, subfolder: str | None = None) -> Denoiser:
    """Any model as a Denoiser: a lafq `.safetensors` U-Net, FP32 or quantized (default: the shipped
    checkpoints/unet.safetensors), or a diffusers pipeline / model folder or Hub repo id, whose class labels
    become conditioning rows with its `lafq.json` null class (train-diffusers folders)."""
    from pathlib import Path

    from .. import paths
    from ..card import CARD_FILE, ModelCard
    from ..pipeline import as_denoiser, load_denoiser

    p = Path(path_or_repo) if path_or_repo is not None else paths.UNET
    if p.suffix == ".safetensors" or p.is_file():
        model, _ = load_denoiser(p)
        try:
            den = as_denoiser(model)
        except TypeError:
            raise ValueError(f"{p} holds a quantized {type(model).__name__}: its scheduler is not in the file; load "
                             "the model's folder and quantize it, or wrap it with from_diffusers(model, scheduler)") from None
        from dataclasses import replace
        return replace(den, source={**den.source, "path": str(p)})
    null = ModelCard.read(p).null_class if (p / CARD_FILE).is_file() else None
    return with_class_conditioning(load_diffusers(p, subfolder=subfolder), null)
