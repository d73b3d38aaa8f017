"""Values made JSON-ready: the one conversion for every record medcam3d writes as JSON."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def json_values(value: Any, digits: int | None = None) -> Any:
    """``value`` as strict JSON values.

    Tensors and arrays become (nested) lists, tuples lists, mapping keys strings, NumPy scalars
    Python numbers, and non-finite floats None (JSON has no NaN or Infinity). ``digits``: round
    floats to that many significant digits. Other objects are written as their ``str``.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(key): json_values(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_values(item, digits) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        return float(f"{float(value):.{digits}g}") if digits else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value if value is None or isinstance(value, (str, int)) else str(value)
