"""The default defect taxonomy of a factory line (see docs/ and the bundle manifest)."""

from __future__ import annotations

__all__ = ["DEFAULT_CLASSES", "PRODUCT_TYPES"]

#: Class names in class-id order. A bundle's manifest is the authority at run time;
#: this is only the default the synthetic line and the default bundle are built with.
DEFAULT_CLASSES: tuple[str, ...] = ("scratch", "crack", "dent", "stain")

#: Product types the synthetic line carries.
PRODUCT_TYPES: tuple[str, ...] = ("bracket", "flange", "casing")
