"""Units for the tables: byte counts in binary units. Standard library only, so that what renders
tables (``lance_cl.cl.report``, a sweep's driver) does not import torch."""
from __future__ import annotations

from typing import Optional

__all__ = ["format_bytes"]


def format_bytes(n: Optional[float], missing: str = "-") -> str:
    """Bytes in binary units with two decimals: 1536 -> '1.50 KiB', 3 * 2**20 -> '3.00 MiB',
    500 -> '500 B'; None -> ``missing``."""
    if n is None:
        return missing
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
