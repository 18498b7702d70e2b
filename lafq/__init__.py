"""LAFQ: layer-adaptive, Fisher-guided quantization of diffusion models."""
__version__ = "0.2.0"


def load(path_or_repo=None, *, subfolder=None):
    """Any model as a `lafq.models.Denoiser` (see lafq.models.load): the one entry to every analysis."""
    from .models import load as _load
    return _load(path_or_repo, subfolder=subfolder)
