"""A Plan: every parameter's fully qualified name -> the precision it is stored in, plus the policy that made it.

Plans know sizes (stored bytes per tensor, scales included) but nothing of Fisher maps or policies, so
quantizing a model never imports the Fisher machinery. JSON from others goes through lafq.planfile.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .precision import PRECISIONS, check_precision, supports, tensor_bytes


@dataclass
class Plan:
    precisions: dict[str, str]  # every parameter's FQN -> precision it is stored in
    policy: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)  # what it was made for: {"path", "class", "digest"} (may be empty)

    def to_json(self) -> str:
        d = {"format": 1, "precisions": self.precisions, "policy": self.policy}
        if self.model:
            d["model"] = self.model
        return json.dumps(d, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
            prec = d["precisions"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"not a LAFQ plan (JSON with a 'precisions' object): {e}") from None
        for name, p in prec.items():
            check_precision(p)
        return cls(dict(prec), d.get("policy", {}))

    def validate(self, shapes: dict[str, tuple]) -> None:
        """Every parameter named exists in the model, and every precision fits its tensor."""
        unknown = sorted(set(self.precisions) - set(shapes))
        if unknown:
            raise ValueError(f"plan names {len(unknown)} parameters the model lacks (e.g. {unknown[:3]})")
        bad = [f"{n}: {p} on shape {shapes[n]}" for n, p in self.precisions.items() if not supports(shapes[n], p)]
        if bad:
            raise ValueError(f"plan asks for integer formats on vectors: {bad[:3]}")

    def counts(self) -> dict[str, int]:
        out = {p: 0 for p in PRECISIONS}
        for p in self.precisions.values():
            out[p] += 1
        return out


def param_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.named_parameters()}


def plan_bytes(precisions: dict[str, str], shapes: dict[str, tuple]) -> int:
    return sum(tensor_bytes(shapes[n], precisions.get(n, "fp32")) for n in shapes)
