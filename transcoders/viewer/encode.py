"""JSON for the viewer: every non-finite float becomes ``null`` (browsers reject ``NaN``)."""

from __future__ import annotations

import json
import math
from typing import Any


def clean(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None, tuples by lists and dict keys made strings,
    recursively (dicts, lists, tuples; other values unchanged)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> str:
    """Compact JSON text of ``clean(obj)`` (non-ASCII kept as is).

    Raises:
        TypeError: a value JSON cannot hold (e.g. a tensor: convert it first).
    """
    return json.dumps(clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
