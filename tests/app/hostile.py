"""Malformed and hostile upload files, built from a valid export of the app's model: name -> (bytes, message).

Each entry is a file the app once mishandled (an internal error, a cryptic message, or acceptance of a
file the CLI rejects) with the words its one-line refusal must contain.
"""
import json

import torch
from safetensors.torch import save

from lafq.checkpoint import read_bytes_checked


def _raw(tensors: dict, lafq: str) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"lafq": lafq})


def hostile_files(model_bytes: bytes) -> dict[str, tuple[bytes, str]]:
    tensors, meta = read_bytes_checked(model_bytes)
    fp32_name = next(k for k, v in tensors.items() if v.dtype == torch.float32 and v.dim() == 4)
    q_name = next(k for k in tensors if k.endswith(".qdata"))

    def variant(change_tensors=None, change_meta=None) -> bytes:
        t, m = dict(tensors), json.loads(json.dumps(meta))
        if change_tensors:
            change_tensors(t)
        if change_meta:
            change_meta(m)
        return _raw(t, json.dumps(m))

    other_cfg = json.loads(json.dumps(meta))
    other_cfg["model"]["config"]["base_channels"] = 2 * other_cfg["model"]["config"]["base_channels"]
    foreign = json.loads(json.dumps(meta))
    foreign["model"] = {"library": "torch", "class": "os.system"}
    return {
        "precisions-list.json": (b'{"precisions": ["fp16"]}', "'precisions' must be a JSON object"),
        "precisions-null.json": (b'{"precisions": null}', "got null"),
        "precisions-string.json": (b'{"precisions": "fp16"}', "got str"),
        "top-level-list.json": (b"[1, 2]", "got a list"),
        "deep.json": (b"[" * 50_000 + b"]" * 50_000, "nested deeper"),
        "avg-bits-string.json": (b'{"precisions": {}, "policy": {"strategy": "budget", "avg_bits": "4.5"}}',
                                 "not a valid lafq policy"),
        "not-utf8.json": (b"\xff\xfe{}", "not UTF-8"),
        "metadata-list.safetensors": (_raw(tensors, "[1, 2]"), "must be a JSON object"),
        "metadata-deep.safetensors": (_raw(tensors, "[" * 50_000 + "]" * 50_000), "not valid JSON"),
        "metadata-string.safetensors": (_raw(tensors, '"quantized"'), "must be a JSON object"),
        "fp8.safetensors": (variant(lambda t: t.__setitem__(fp32_name, t[fp32_name].to(torch.float8_e4m3fn))),
                            "is float8_e4m3fn, expected float32"),
        "wrong-shape.safetensors": (variant(lambda t: t.__setitem__(fp32_name, t[fp32_name].flatten())), "has shape"),
        "wrong-dtype.safetensors": (variant(lambda t: t.__setitem__(q_name, t[q_name].float())), "expected int8"),
        "nan-weights.safetensors": (variant(lambda t: t.__setitem__(fp32_name, torch.full_like(t[fp32_name], float("nan")))),
                                    "NaN or infinite"),
        "extra-tensor.safetensors": (variant(lambda t: t.__setitem__("payload", torch.zeros(1000))),
                                     "does not account for"),
        "missing-tensor.safetensors": (variant(lambda t: t.pop(fp32_name)), "missing tensor"),
        "other-network.safetensors": (_raw(tensors, json.dumps(other_cfg)), "is another network"),
        "foreign-class.safetensors": (_raw(tensors, json.dumps(foreign)), "a os.system, not a UNet"),
        "policy-garbage.safetensors": (variant(change_meta=lambda m: m["plan"].__setitem__("policy", {"avg_bits": "x"})),
                                       "not a valid lafq policy"),
        "unet-kind.safetensors": (variant(change_meta=lambda m: m.__setitem__("kind", "unet")), "upload a quantized model"),
        "pickle.safetensors": (b"\x80\x04\x95 pickled stuff", "not a valid .safetensors"),
        "unknown.pt": (b"\x80\x04", "accepted files are"),
    }
