"""The adapter for a vendor's name, as a practice's settings spell it ("dosespot").

An adapter holds an HTTP connection pool, cached tokens and the circuit breakers of the vendor's
API roots: make it once per process (in `build()`) and keep it; `close()` it on the way out.
"""

from __future__ import annotations

from typing import Any

from services.erx_bridge.vendors.base import VendorAdapter
from services.erx_bridge.vendors.dosespot import DoseSpotAdapter

__all__ = ["VENDORS", "adapter_for"]

VENDORS = ("dosespot",)


def adapter_for(vendor: str, **options: Any) -> VendorAdapter:
    """A new adapter for `vendor`; `options` go to its constructor (DoseSpot: `subscription_key`,
    timeouts, `breakers`, ...). An unknown vendor is a ValueError."""
    if isinstance(vendor, str) and vendor.strip().lower() == "dosespot":
        return DoseSpotAdapter(**options)
    raise ValueError(f"unknown eRx vendor {vendor!r} (known: {', '.join(VENDORS)})")
