"""What the benchmark scripts share to write their figures."""

from __future__ import annotations

import math


def plain_json(v):
    """``v`` made JSON-ready: nan becomes null (strict JSON has no nan), keys strings."""
    if isinstance(v, dict):
        return {str(k): plain_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [plain_json(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return None
    return v
