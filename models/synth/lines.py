"""Synthetic production lines: which products a line carries and which defects appear on it.

The ``default`` line is what the default model is trained and evaluated on. The others are the
situations of the learning loop (issue 6): ``porosity``, the default products with a defect type
that appears after deployment (a fifth class, porosity, on half of the defects), and ``cover``,
a new line carrying a product the model never saw (painted covers) with the four default defects.
Each line has its own random stream (``seed_tag``), so its scenes are not the default line's.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.taxonomy import DEFAULT_CLASSES, DEFECT_CATALOGUE, PRODUCT_CATALOGUE, PRODUCT_TYPES

__all__ = ["LINES", "LineSpec", "get_line"]


@dataclass(frozen=True)
class LineSpec:
    """A line: ``products`` drawn uniformly; each defect's type drawn uniformly from ``defects``
    (ids into ``DEFECT_CATALOGUE``; repeat an id to weight it); ``classes`` label the dataset."""

    name: str
    products: tuple[str, ...]
    defects: tuple[int, ...]
    classes: tuple[str, ...]
    defect_rate: float = 0.3
    seed_tag: int = 0  # 0: the default line's stream (kept byte-identical)

    def __post_init__(self) -> None:
        unknown = [p for p in self.products if p not in PRODUCT_CATALOGUE]
        if unknown:
            raise ValueError(f"line {self.name!r}: unknown products {unknown}; known: {list(PRODUCT_CATALOGUE)}")
        names = [DEFECT_CATALOGUE[d] for d in self.defects]
        missing = sorted(set(names) - set(self.classes))
        if missing:
            raise ValueError(f"line {self.name!r}: defects {missing} are not in its classes {list(self.classes)}")
        if list(self.classes[: len(DEFAULT_CLASSES)]) != list(DEFAULT_CLASSES[: len(self.classes)]):
            raise ValueError(f"line {self.name!r}: classes must start with {list(DEFAULT_CLASSES)}")

    def class_id(self, defect: int) -> int:
        """The dataset class id of catalogue defect ``defect``."""
        return self.classes.index(DEFECT_CATALOGUE[defect])


LINES: dict[str, LineSpec] = {
    "default": LineSpec("default", PRODUCT_TYPES, (0, 1, 2, 3), DEFAULT_CLASSES),
    "porosity": LineSpec("porosity", PRODUCT_TYPES, (0, 1, 2, 3, 4, 4, 4, 4), (*DEFAULT_CLASSES, "porosity"),
                         defect_rate=0.5, seed_tag=101),
    "cover": LineSpec("cover", ("cover",), (0, 1, 2, 3), DEFAULT_CLASSES, defect_rate=0.5, seed_tag=102),
}


def get_line(name: str) -> LineSpec:
    """The line called ``name``; ValueError naming the known ones."""
    try:
        return LINES[name]
    except KeyError:
        raise ValueError(f"unknown line {name!r}; known: {sorted(LINES)}") from None
