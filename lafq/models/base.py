"""The denoiser contract every analysis runs on: one model, its noise schedule, its training target.

A `Denoiser` wraps any `nn.Module` that predicts from a noisy sample `x_t` and integer timesteps `t`:

    pred = den.predict(x_t, t, rows)      rows: which captured conditioning row each sample uses
    den.noisy(x0, noise, t)               x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, in x0's dtype
    den.target(x0, noise, t)              what the model was trained to predict, by `prediction_type`:
                                              epsilon       noise
                                              v_prediction  sqrt(abar_t) noise - sqrt(1 - abar_t) x0
                                              sample        x0
                                              flow          noise - x0 (rectified flow's velocity; then
                                                            x_t = (1 - sigma_t) x0 + sigma_t noise)
    den.losses(x0, noise, t, rows)        per-sample MSE to the target, (S,): the loss Fisher maps score
    den.eps(x_t, t, rows)                 the prediction turned into a noise estimate (what samplers use)

The formulas are diffusers' `DDPMScheduler.add_noise` / `get_velocity` and, for flow matching,
`FlowMatchEulerDiscreteScheduler.scale_noise` with the velocity target of diffusers' SD3 training script, computed
in the sample's dtype (float64 in the tests), so a model trained with a diffusers scheduler is scored on its own
target. Integer timesteps t index the schedule's training grid; the model is called with
`schedule.model_timesteps(t)` (t itself, or sigma_t * T for flow matching).

Conditioning (class labels, `encoder_hidden_states`, `added_cond_kwargs`, ...) is captured from one real
call (`capture_conditioning`) and replayed row by row with fresh noise: no per-architecture code
beyond the small function that calls the model.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import Schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")

# (model callable, x_t, t, conditioning keyword arguments) -> prediction shaped like x_t
CallFn = Callable[[Callable, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def _index(value: Any, idx: torch.Tensor, rows: int, like: torch.Tensor) -> Any:
    """Pick rows `idx` of every per-row tensor in a (nested) value; float tensors take `like`'s dtype and device."""
    if isinstance(value, dict):
        return {k: _index(v, idx, rows, like) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_index(v, idx, rows, like) for v in value)
    if not torch.is_tensor(value):
        return value
    if value.dim() and value.shape[0] == rows:
        value = value[idx.to(value.device)]
    if value.is_floating_point():
        return value.to(device=like.device, dtype=like.dtype)
    return value.to(like.device)


@dataclass(frozen=True)
class Conditioning:
    """Keyword inputs of one real model call, minus the sample and timestep.

    Tensors whose first dimension is `rows` are per-row and replayed by row index; anything else
    (scalars, flags, dicts of options) is passed unchanged to every call. A captured guided call
    (conditional and unconditional rows batched together) replays both branches.
    """
    kwargs: dict
    rows: int

    def __post_init__(self):
        if not isinstance(self.kwargs, dict):
            raise TypeError(f"conditioning kwargs must be a dict, got {type(self.kwargs).__name__}")
        if self.rows < 1:
            raise ValueError(f"conditioning needs at least one row, got {self.rows}")

    def select(self, idx: torch.Tensor, like: torch.Tensor) -> dict:
        """The keyword arguments for a batch whose sample s uses row idx[s]."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.rows):
            raise ValueError(f"conditioning rows must be in [0, {self.rows}), got {idx.tolist()}")
        return _index(self.kwargs, idx, self.rows, like)


def save_conditioning(path, cond: Conditioning) -> None:
    """Write captured conditioning as `.safetensors` (kind "conditioning"): tensors under their keyword
    names (nested dicts as `outer.inner`), other values as JSON in the metadata."""
    from ..checkpoint import save_file

    tensors, static = {}, {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif torch.is_tensor(value):
            tensors[prefix[:-1]] = value
        else:
            static[prefix[:-1]] = value

    walk("", cond.kwargs)
    save_file(path, tensors, {"kind": "conditioning", "rows": cond.rows, "static": static})


def load_conditioning(path) -> Conditioning:
    from ..checkpoint import CheckpointError, load_file

    tensors, meta = load_file(path, kind="conditioning")
    kwargs: dict = {}
    for key, value in [*tensors.items(), *meta.get("static", {}).items()]:
        *outer, last = key.split(".")
        d = kwargs
        for k in outer:
            d = d.setdefault(k, {})
        d[last] = value
    try:
        return Conditioning(kwargs, int(meta["rows"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid conditioning metadata ({e})") from None


class _Captured(Exception):
    def __init__(self, arguments):
        self.arguments = arguments


def capture_conditioning(module: nn.Module, run: Callable[[], Any]) -> Conditioning:
    """Run `run()` (e.g. a pipeline call) until it first calls `module`, and keep that call's inputs.

    The call is stopped there (nothing else of the pipeline runs). The first parameter of
    `module.forward` is the sample; the timestep is the parameter named `timestep` (diffusers' name
    in every model, wherever it stands: Transformer2DModel takes encoder_hidden_states before it),
    `timesteps` or `t`, else the second one. Every other argument given is kept.
    """
    sig = inspect.signature(module.forward)
    names = list(sig.parameters)
    if len(names) < 2:
        raise ValueError(f"{type(module).__name__}.forward takes {names}; a denoiser takes (sample, timestep, ...)")
    time_name = next((n for n in ("timestep", "timesteps", "t") if n in names), names[1])

    def pre_hook(_mod, args, kwargs):
        raise _Captured(sig.bind(*args, **kwargs).arguments)

    handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        run()
    except _Captured as c:
        arguments = dict(c.arguments)
    else:
        raise ValueError(f"the call never ran {type(module).__name__}: nothing to capture")
    finally:
        handle.remove()
    sample = arguments.pop(names[0])
    arguments.pop(time_name, None)
    arguments.pop("return_dict", None)  # the adapter asks for a tuple itself
    var_kw = [n for n, p in sig.parameters.items() if p.kind is inspect.Parameter.VAR_KEYWORD]
    for n in var_kw:  # **kwargs bind as one dict: spread it back into keywords
        arguments.update(arguments.pop(n, {}))
    kept = {k: _detach(v) for k, v in arguments.items() if v is not None}
    return Conditioning(kept, int(sample.shape[0]))


def _detach(value):
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_detach(v) for v in value)
    return value.detach().clone() if torch.is_tensor(value) else value


def _bcast(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return coef.reshape(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class Denoiser:
    """A model with what it takes to score and sample it; see the module docstring."""
    module: nn.Module
    call: CallFn
    schedule: Schedule
    prediction_type: str
    sample_shape: tuple[int, ...]
    conditioning: Conditioning | None = None
    source: dict = field(default_factory=dict)  # where it came from: library, class, config, path
    null_row: int | None = None  # the conditioning row of the unconditional branch, where there is one

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if not isinstance(self.module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(self.module).__name__}")
        if (self.prediction_type == "flow") != self.schedule.flow:
            raise ValueError("prediction_type 'flow' goes with a flow-matching schedule (sigmas), and only with one")
        object.__setattr__(self, "sample_shape", tuple(int(s) for s in self.sample_shape))
        if not self.sample_shape or min(self.sample_shape) < 1:
            raise ValueError(f"sample_shape must be positive sizes, got {self.sample_shape}")

    def with_conditioning(self, conditioning: Conditioning | None, null_row: int | None = None) -> Denoiser:
        """The same denoiser replaying other conditioning (e.g. captured from a pipeline call)."""
        return replace(self, conditioning=conditioning, null_row=null_row)

    @property
    def T(self) -> int:
        return self.schedule.T

    def require_inputs(self) -> None:
        """Refuse, in one line, a model whose forward needs inputs that neither the call nor the conditioning
        supplies (a cross-attention U-Net without `encoder_hidden_states`: it failed deep inside its forward)."""
        try:
            params = list(inspect.signature(self.module.forward).parameters.values())
        except (TypeError, ValueError):
            return
        given = set(self.conditioning.kwargs) if self.conditioning is not None else set()
        missing = [p.name for p in params[2:] if p.default is inspect.Parameter.empty and p.name not in given
                   and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("timestep", "timesteps", "t")]
        if missing:
            raise ValueError(f"{type(self.module).__name__} needs {', '.join(missing)}, which nothing supplies: capture "
                             "it from one real call (lafq.models.capture_conditioning; the CLI's --conditioning FILE)")

    def _abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _bcast(self.schedule.alphas_cumprod.to(device=like.device, dtype=like.dtype)[t.to(like.device)], like)

    def _sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _bcast(self.schedule.sigmas.to(device=like.device, dtype=like.dtype)[t.to(like.device)], like)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.schedule.flow:
            s = self._sigma(t, x0)
            return (1 - s) * x0 + s * noise
        a = self._abar(t, x0)
        return a ** 0.5 * x0 + (1 - a) ** 0.5 * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "flow":
            return noise - x0
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        a = self._abar(t, x0)
        return a ** 0.5 * noise - (1 - a) ** 0.5 * x0

    def kwargs_for(self, rows: torch.Tensor | None, like: torch.Tensor) -> dict:
        if self.conditioning is None:
            return {}
        if rows is None:
            rows = torch.zeros(like.shape[0], dtype=torch.long)
        return self.conditioning.select(rows, like)

    def predict(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None = None, *, fn: Callable | None = None):
        """The model's output for x_t at training timesteps t; `fn` replaces the module (e.g. a functional_call)."""
        return self.call(fn or self.module, x, self.schedule.model_timesteps(t), self.kwargs_for(rows, x))

    def losses(self, x0, noise, t, rows=None, *, fn: Callable | None = None) -> torch.Tensor:
        pred = self.predict(self.noisy(x0, noise, t), t, rows, fn=fn)
        return F.mse_loss(pred, self.target(x0, noise, t), reduction="none").flatten(1).mean(1)

    def eps(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        pred = self.predict(x, t, rows)
        if self.prediction_type == "flow":  # x_t = (1 - s) x0 + s eps and v = eps - x0 give eps = x_t + (1 - s) v
            return x + (1 - self._sigma(t, x)) * pred
        if self.prediction_type == "epsilon":
            return pred
        a = self._abar(t, x)
        if self.prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x_t
            return a ** 0.5 * pred + (1 - a) ** 0.5 * x
        return (x - a ** 0.5 * pred) / (1 - a) ** 0.5

    def x0_estimate(self, x: torch.Tensor, t: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The model's estimate of the clean sample from x_t: x_t - sigma v (flow), else from its noise estimate."""
        if self.prediction_type == "flow":
            return x - self._sigma(t, x) * self.predict(x, t, rows)
        a = self._abar(t, x)
        return (x - (1 - a) ** 0.5 * self.eps(x, t, rows)) / a ** 0.5

    def compute_dtype(self) -> torch.dtype:
        """The dtype the model computes in (a quantized model's dequantization dtype)."""
        for m in self.module.modules():
            if hasattr(m, "_lafq_stored"):
                return getattr(m, "_lafq_dtype", torch.float32)
        return next((p.dtype for p in self.module.parameters() if p.is_floating_point()), torch.float32)

    def eps_denoiser(self) -> Callable:
        """`eps = f(x, t, y)` for lafq.diffusion's DDPM-family samplers, y being conditioning rows (None: row 0);
        the sampler's float32 state enters in the model's dtype (looked up once, not at every step). A
        flow-matching model: `v = f(x, timesteps, y)`, its velocity at the model's own float timesteps, for
        lafq.diffusion.flow_sample."""
        dtype = self.compute_dtype()
        flow = self.schedule.flow

        def eps(x, t, y=None):
            # lafq's samplers run in inference mode; some quantization libraries (optimum-quanto) cannot
            # build their tensors from inference tensors, so the model runs under no_grad on plain copies.
            with torch.inference_mode(False), torch.no_grad():
                x, t = x.to(dtype).clone(), t.clone()
                y = y.clone() if torch.is_tensor(y) else y
                return self.call(self.module, x, t, self.kwargs_for(y, x)) if flow else self.eps(x, t, y)
        return eps

    def sample(self, n: int, *, steps: int = 50, seed: int = 0, rows=None, guidance: float = 1.0,
               clip: bool = False, sampler: str = "ddim", eta: float = 0.0, batch_size: int = 256) -> torch.Tensor:
        """n samples (lafq.pipeline.denoise: one generator seeded with `seed`, the same noise as every other
        sampling entry) replaying conditioning `rows` (None: row 0 where there is conditioning); guidance != 1
        needs the unconditional row (`null_row`). clip=False: latents are not in [-1, 1]."""
        from ..pipeline import SampleSpec, denoise

        if rows is None and self.conditioning is not None:
            rows = [0]
        spec = SampleSpec(n=n, labels=(), steps=steps, sampler=sampler, eta=eta, guidance=guidance, seed=seed,
                          batch_size=min(batch_size, n))
        return denoise(self, spec, clip=clip, rows=rows)[0]
