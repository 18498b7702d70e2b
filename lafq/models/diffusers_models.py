"""Adapter for diffusers denoisers: UNet2DModel, UNet2DConditionModel, DiTTransformer2DModel,
Transformer2DModel, and any other ModelMixin called as `model(sample, timestep, **conditioning)`.

`load_diffusers(path_or_repo)` is the real `from_pretrained` path: a local folder (a pipeline folder
with `model_index.json`, or a model folder with `config.json` beside a `scheduler/` folder or a
`scheduler_config.json`) or a Hub repo id, weights from `.safetensors` only. The training target
follows `scheduler.config.prediction_type`; the schedule is the scheduler's own `alphas_cumprod`.
Models that also predict a variance (DiT with learned sigma: twice the input channels) are scored
on the prediction half, as diffusers' pipelines split it.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..diffusion import Schedule
from .base import Conditioning, Denoiser


def _call(fn, x, t, kwargs):
    # timestep by name: Transformer2DModel takes encoder_hidden_states second
    out = fn(x, timestep=t, **kwargs, return_dict=False)[0]
    c = x.shape[1]
    return out[:, :c] if out.shape[1] == 2 * c else out  # learned variance: the first half is the prediction


FLOW_OPTIONS_UNSUPPORTED = ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                            "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling")


def schedule_of(scheduler) -> Schedule:
    """The scheduler's training schedule in float64 (diffusers computes it in float32; the values are kept).
    FlowMatchEulerDiscreteScheduler (rectified flow) with a static shift: its sigmas (lafq.diffusion.flow_schedule);
    its resolution-dependent (dynamic) shift and other sigma families are refused in one line."""
    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        from ..diffusion import flow_schedule

        cfg = scheduler.config
        used = [k for k in FLOW_OPTIONS_UNSUPPORTED if cfg.get(k)]
        if used:
            raise ValueError(f"FlowMatchEulerDiscreteScheduler with {', '.join(used)} is not supported: lafq samples "
                             "and scores flow matching with a static shift and the scheduler's plain sigmas")
        return flow_schedule(int(cfg["num_train_timesteps"]), float(cfg.get("shift", 1.0)))
    try:
        betas, abar = scheduler.betas, scheduler.alphas_cumprod
    except AttributeError:
        raise ValueError(f"{type(scheduler).__name__} has no betas/alphas_cumprod: DDPM-family (discrete-time) "
                         f"schedulers and FlowMatchEulerDiscreteScheduler are supported") from None
    return Schedule(betas=betas.double().cpu(), alphas_cumprod=abar.double().cpu())


def _sample_shape(model: nn.Module) -> tuple[int, ...]:
    cfg = model.config
    size = cfg.get("sample_size")
    if size is None or cfg.get("in_channels") is None:
        raise ValueError(f"{type(model).__name__}'s config has no sample_size/in_channels; pass sample_shape")
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return (int(cfg["in_channels"]), int(h), int(w))


def model_class_name(model: nn.Module) -> str:
    """The diffusers class a (possibly quantized) model was built from."""
    return getattr(model, "_lafq_base_class", type(model)).__name__


def config_dict(model: nn.Module) -> dict:
    """The model's config as plain JSON values, without diffusers' private bookkeeping keys."""
    return json.loads(json.dumps({k: v for k, v in dict(model.config).items() if not k.startswith("_")}, default=_jsonable))


def _jsonable(value):
    """Tuples come as lists already; a quantization config (a loaded quantized model) as its own dict."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return list(value) if isinstance(value, (set, frozenset)) else str(value)


def from_diffusers(model: nn.Module, scheduler, *, conditioning: Conditioning | None = None,
                   sample_shape: tuple[int, ...] | None = None, null_row: int | None = None,
                   source: dict | None = None) -> Denoiser:
    """Wrap a diffusers model and its scheduler (the scheduler decides the target and the noise schedule)."""
    schedule = schedule_of(scheduler)
    prediction_type = "flow" if schedule.flow else scheduler.config.get("prediction_type", "epsilon")
    return Denoiser(module=model, call=_call, schedule=schedule, prediction_type=prediction_type,
                    sample_shape=sample_shape or _sample_shape(model), conditioning=conditioning,
                    source={"library": "diffusers", "class": model_class_name(model), "config": config_dict(model),
                            **(source or {})},
                    null_row=null_row)


def _layout(path_or_repo: str, subfolder: str | None) -> tuple[str | None, str | None]:
    """(model subfolder, scheduler subfolder) for a local folder; hub repos are read as pipelines."""
    p = Path(path_or_repo)
    if not p.is_dir():
        if subfolder is not None:
            return subfolder, "scheduler"
        from diffusers import (
            DiffusionPipeline,  # a Hub repo: the pipeline index names the denoiser
        )
        index = DiffusionPipeline.load_config(path_or_repo)
        return ("transformer" if "transformer" in index else "unet"), "scheduler"
    if subfolder is None and (p / "model_index.json").is_file():
        subfolder = "transformer" if (p / "transformer").is_dir() else "unet"
    elif subfolder is None and not (p / "config.json").is_file():  # unet/ + scheduler/ without a pipeline index
        subfolder = next((c for c in ("transformer", "unet") if (p / c / "config.json").is_file()), None)
    model_dir = p / subfolder if subfolder else p
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json: not a diffusers model folder")
    for cand, sub in ((p / "scheduler", "scheduler"), (model_dir / "scheduler", f"{subfolder}/scheduler" if subfolder else "scheduler"),
                      (p, None)):
        if (cand / "scheduler_config.json").is_file():
            return subfolder, sub
    raise ValueError(f"no scheduler config for {path_or_repo}: expected scheduler/scheduler_config.json "
                     f"(the prediction type and noise schedule come from it)")


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # owner/name, as the Hub spells repo ids


def local_or_hub(path_or_repo: str | Path) -> str:
    """The argument as from_pretrained gets it; a missing path that cannot be a Hub id (owner/name) is refused
    here in one line: from_pretrained tried the Hub for it, 5 times over 39 s, before failing."""
    text = str(path_or_repo)
    if not Path(text).exists() and not HUB_ID.fullmatch(text):
        raise ValueError(f"no such folder: {text} (a Hub model is named owner/name)")
    return text


def load_diffusers_model(path_or_repo: str | Path, *, subfolder: str | None = None, dtype: torch.dtype = torch.float32):
    """Only the model (no scheduler needed): a model folder, a pipeline folder (its unet/transformer) or a Hub repo."""
    from diffusers import AutoModel, ModelMixin

    path_or_repo = local_or_hub(path_or_repo)
    p = Path(path_or_repo)
    if p.is_dir():
        if subfolder is None and (p / "model_index.json").is_file():
            subfolder = "transformer" if (p / "transformer").is_dir() else "unet"
        if not ((p / subfolder if subfolder else p) / "config.json").is_file():
            raise ValueError(f"{p / subfolder if subfolder else p} has no config.json: not a diffusers model folder")
    model = AutoModel.from_pretrained(path_or_repo, subfolder=subfolder, use_safetensors=True, dtype=dtype)
    if not isinstance(model, ModelMixin):
        raise ValueError(f"{path_or_repo}: {type(model).__name__} is not a diffusers model")
    return model.eval()


def load_scheduler(path_or_repo: str, subfolder: str | None = "scheduler"):
    import diffusers
    from diffusers import SchedulerMixin

    cfg = diffusers.DDPMScheduler.load_config(path_or_repo, subfolder=subfolder)
    cls = getattr(diffusers, str(cfg.get("_class_name")), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(f"{path_or_repo}: unknown scheduler class {cfg.get('_class_name')!r}")
    return cls.from_config(cfg)


def load_diffusers(path_or_repo: str | Path, *, subfolder: str | None = None, conditioning: Conditioning | None = None,
                   sample_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32) -> Denoiser:
    """Load a diffusers denoiser and its scheduler with `from_pretrained` (safetensors only)."""
    from diffusers import AutoModel, ModelMixin

    path_or_repo = local_or_hub(path_or_repo)
    model_sub, sched_sub = _layout(path_or_repo, subfolder)
    model = AutoModel.from_pretrained(path_or_repo, subfolder=model_sub, use_safetensors=True, dtype=dtype)
    if not isinstance(model, ModelMixin):
        raise ValueError(f"{path_or_repo}: {type(model).__name__} is not a diffusers model")
    scheduler = load_scheduler(path_or_repo, sched_sub)
    return from_diffusers(model.eval(), scheduler, conditioning=conditioning, sample_shape=sample_shape,
                          source={"path": path_or_repo, "subfolder": model_sub})


def with_class_conditioning(den: Denoiser, null_class: int | None) -> Denoiser:
    """A class-conditional diffusers model (`num_class_embeds`, e.g. a train-diffusers UNet2DModel) replaying one
    conditioning row per class embedding (row i: class_labels=i), `null_class` the unconditional row; any
    other model unchanged (sampled without class conditioning)."""
    config = getattr(den.module, "config", None)
    get = config.get if config is not None and hasattr(config, "get") else (lambda _k, _d=None: None)
    k = get("num_class_embeds")
    if not k and model_class_name(den.module) == "DiTTransformer2DModel" and get("num_embeds_ada_norm"):
        k = int(get("num_embeds_ada_norm")) + 1  # its classes, then diffusers' classifier-free (null) label row
        null_class = k - 1 if null_class is None else null_class  # that row is its null class, card or not
    if not k:
        return den
    k = int(k)
    if null_class is not None and not 0 <= int(null_class) < k:
        raise ValueError(f"null_class {null_class} is not a class embedding of this model ({k} embeddings)")
    return den.with_conditioning(Conditioning({"class_labels": torch.arange(k)}, k), null_class)


def encode_captions(folder: str | Path, captions: list[str], *, device="cpu", batch_size: int = 16) -> Conditioning:
    """Conditioning rows of a text-to-image pipeline folder for `captions`, then the empty caption (the
    unconditional row classifier-free guidance uses, last: row len(captions)). The folder's `tokenizer/` and
    `text_encoder/` encode each caption as diffusers' Stable Diffusion 1.x/2.x pipelines encode a prompt: padded
    to the tokenizer's max length, truncated, the encoder's last hidden state as `encoder_hidden_states` (no
    attention mask). The encoder class is the one its config names. A pipeline with a second or third text
    encoder (SDXL, SD3) conditions on more than that and is refused in one line."""
    folder = Path(folder)
    missing = [sub for sub in ("tokenizer", "text_encoder") if not (folder / sub).is_dir()]
    if missing:
        raise ValueError(f"{folder} has no {' or '.join(s + '/' for s in missing)}: captions need a text-to-image "
                         "pipeline folder (tokenizer/ and text_encoder/ beside unet/)")
    extra = [sub for sub in ("text_encoder_2", "text_encoder_3") if (folder / sub).is_dir()]
    if extra:
        raise ValueError(f"{folder} has {' and '.join(s + '/' for s in extra)}: captions are encoded for pipelines "
                         "with one text encoder (Stable Diffusion 1.x/2.x); capture this pipeline's conditioning "
                         "from a real call instead (lafq.models.capture_conditioning, --conditioning)")
    try:
        import transformers
    except ImportError:
        raise ValueError("captions need the transformers package: pip install transformers") from None
    tok = transformers.AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")
    config = transformers.AutoConfig.from_pretrained(folder, subfolder="text_encoder")
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    encoder = (cls or transformers.AutoModel).from_pretrained(folder, subfolder="text_encoder").eval().to(device)
    texts = [str(c) for c in captions] + [""]
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            ids = tok(texts[start:start + batch_size], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids.to(device)
            try:
                hidden = encoder(ids).last_hidden_state  # not [0]: a WithProjection encoder's first output is pooled
            except (RuntimeError, IndexError) as e:
                line = " ".join(str(e).split())[:160]
                raise ValueError(f"{folder}/text_encoder failed on the captions ({type(e).__name__}: {line})") from None
            out.append(hidden.float().cpu())
    return Conditioning({"encoder_hidden_states": torch.cat(out)}, len(texts))
