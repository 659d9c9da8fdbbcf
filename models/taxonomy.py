"""The default defect taxonomy of a factory line (see docs/ and the bundle manifest)."""

from __future__ import annotations

__all__ = ["DEFAULT_CLASSES", "DEFECT_CATALOGUE", "PRODUCT_CATALOGUE", "PRODUCT_TYPES"]

#: Class names in class-id order. A bundle's manifest is the authority at run time;
#: this is only the default the synthetic line and the default bundle are built with.
DEFAULT_CLASSES: tuple[str, ...] = ("scratch", "crack", "dent", "stain")

#: Product types the synthetic line carries.
PRODUCT_TYPES: tuple[str, ...] = ("bracket", "flange", "casing")

#: Every defect type the synthetic line can draw, by defect id: the default classes, then types
#: the default line never shows (``models.synth.lines``: a new defect appearing after deployment).
DEFECT_CATALOGUE: tuple[str, ...] = (*DEFAULT_CLASSES, "porosity")

#: Every product the synthetic line can draw: the default products, then a product the default
#: line never carries (a new line).
PRODUCT_CATALOGUE: tuple[str, ...] = (*PRODUCT_TYPES, "cover")
