"""Preset plans: a newcomer's first step. Each preset is the keyword arguments of a lafq Policy.

Order is the order shown; append new strategies here (they need nothing else in the UI).
The budget preset is the Fisher-guided plan; uniform INT4, INT4 with INT8 stem and head, and group-wise
INT4-g32 are the simple baselines it is compared with at equal size (docs/report.md); the other four are
the source's FP16 strategies with its settings.
"""
from __future__ import annotations

from types import MappingProxyType

from lafq.policy import Policy

BUDGET_45 = "budget 4.5 bits (Fisher-guided INT4/INT8/FP16)"
UNIFORM_INT4 = "uniform INT4 (same size, no Fisher)"

PRESETS = MappingProxyType({
    BUDGET_45: dict(strategy="budget", avg_bits=4.5, statistic="mean"),
    UNIFORM_INT4: dict(strategy="uniform", target="int4"),
    "INT4 with INT8 stem and head (the usual recipe)": dict(strategy="first-last", target="int4", edge="int8"),
    "uniform INT4-g32 (group-wise, 4.5 bits)": dict(strategy="uniform", target="int4-g32"),
    "source: global threshold 0.01 → FP16": dict(strategy="global", target="fp16", threshold=0.01, statistic="final"),
    "source: groups (keep encoder) → FP16": dict(strategy="groups", target="fp16", statistic="final"),
    "source: layer-ratio p=0.25 → FP16": dict(strategy="layer-ratio", target="fp16", p=0.25, statistic="final"),
    "source: layer-std k=0 → FP16": dict(strategy="layer-std", target="fp16", k=0.0, statistic="final"),
})
DEFAULT_PRESET = BUDGET_45
CUSTOM = "custom (the controls below)"
from lafq.policy import NO_FISHER_STRATEGIES  # noqa: E402  (what a model without a Fisher map can still plan)


def presets_for(has_fisher: bool = True) -> list[str]:
    """The presets shown for a model: every one (stem and head, groups and the middle block are the model's
    own, lafq.layers); only Fisher-free ones for a model without a Fisher map."""
    return [name for name, kw in PRESETS.items() if has_fisher or kw["strategy"] in NO_FISHER_STRATEGIES]


def default_preset(has_fisher: bool = True) -> str:
    shown = presets_for(has_fisher)
    return DEFAULT_PRESET if DEFAULT_PRESET in shown else UNIFORM_INT4


def preset_policy(name: str) -> Policy:
    return Policy(**PRESETS[name], label=name) if "label" in Policy.__dataclass_fields__ else Policy(**PRESETS[name])
