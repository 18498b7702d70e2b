"""Plan JSON files from anyone: parse and validate, or raise ValueError with one line saying what is wrong.

Accepted: a JSON object {"precisions": {parameter name: precision, ...}, "policy": {...}?, "format": 1?}
of at most MAX_PLAN_BYTES, nesting at most MAX_DEPTH deep; precisions from lafq.precision.PRECISIONS;
"policy", when present, an object that lafq.policy.Policy accepts (it names the plan; the precisions
are what is applied); "model", when present, the model it was made for ({"path", "class", "digest"}: what
`export` and `quantize --plan` load by default). Whether the names fit a model is `Plan.validate(shapes)`'s job.
"""
from __future__ import annotations

import json

from .policy import Plan, Policy
from .precision import PRECISIONS

MAX_PLAN_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 8
MAX_NAMES = 100_000


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:40] + "…"


def _depth(text: str) -> int:
    """Deepest bracket nesting outside strings (json.loads would hit Python's recursion limit first)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def check_policy(policy) -> dict:
    """A plan's policy: {} or an object Policy(**policy) accepts; returned as a plain dict."""
    if policy is None:
        return {}
    if not isinstance(policy, dict):
        raise ValueError(f"'policy' must be a JSON object, got {type(policy).__name__}")
    if not policy:
        return {}
    try:
        Policy(**policy)
    except (TypeError, ValueError) as e:
        raise ValueError(f"'policy' is not a valid lafq policy ({_short(str(e))[:120]})") from None
    return dict(policy)


def check_precisions(precisions) -> dict[str, str]:
    if not isinstance(precisions, dict):
        raise ValueError(f"'precisions' must be a JSON object of parameter name -> precision, "
                         f"got {type(precisions).__name__ if precisions is not None else 'null'}")
    if len(precisions) > MAX_NAMES:
        raise ValueError(f"'precisions' names {len(precisions):,} parameters; at most {MAX_NAMES:,} are accepted")
    bad = [(k, v) for k, v in precisions.items() if not isinstance(v, str) or v not in PRECISIONS]
    if bad:
        k, v = bad[0]
        raise ValueError(f"unknown precision {_short(v)} for {_short(k)}; accepted: {', '.join(PRECISIONS)}")
    return dict(precisions)


def plan_from_dict(d, what: str = "plan") -> Plan:
    if not isinstance(d, dict):
        raise ValueError(f"not a LAFQ {what}: expected a JSON object with a 'precisions' object, "
                         f"got a {type(d).__name__ if d is not None else 'null'}")
    if "precisions" not in d:
        raise ValueError(f"not a LAFQ {what}: the JSON object has no 'precisions' key")
    if d.get("format", 1) != 1:
        raise ValueError(f"plan format {_short(d.get('format'))} is not supported (this lafq reads format 1)")
    return Plan(check_precisions(d["precisions"]), check_policy(d.get("policy")), check_model(d.get("model")))


def check_model(model) -> dict:
    """The plan's "model" record (what it was made for): an object of at most 8 short strings."""
    if model is None:
        return {}
    if not isinstance(model, dict) or len(model) > 8 or not all(
            isinstance(k, str) and isinstance(v, str) and len(v) <= 1000 for k, v in model.items()):
        raise ValueError("'model' must be a JSON object of a few strings (path, class, digest)")
    return dict(model)


def read_plan(data: bytes | str, name: str = "plan") -> Plan:
    """Bytes or text of a plan file -> Plan; ValueError naming the problem otherwise."""
    if len(data) > MAX_PLAN_BYTES:
        raise ValueError(f"{name} is {len(data):,} bytes; plan files are at most {MAX_PLAN_BYTES:,} bytes")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}); a plan is a JSON file") from None
    if _depth(data) > MAX_DEPTH:
        raise ValueError(f"{name}: JSON nested deeper than {MAX_DEPTH} levels; a plan is a flat object")
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{name}: not a LAFQ plan (invalid JSON: {_short(str(e))})") from None
    try:
        return plan_from_dict(d)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
