"""Step 1 of the method: split an unlabelled stack into subset 1, subset 2 and a held-out test set.

Subset 1 (paper: 5 images) gets rough masks and trains pix2pix; subset 2 (the rest) teaches CycleGAN the real
contrast; the test images (paper: train:test 4:1) are kept for scoring the final segmenter. The split is a pure
function of the item names and the seed, so a resumed or re-run pipeline gets the same split whatever order the
files were listed in.

    split = split_stack(names, subset1_size=5, test_fraction=0.2, seed=0)
    split.save("run/split.json"); same = StackSplit.load("run/split.json")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class StackSplit:
    """Disjoint item names (file names, keys or URIs) of the three parts of a stack."""

    subset1: list[str]
    subset2: list[str]
    test: list[str]

    @property
    def all(self) -> list[str]:
        """Every item, subset 1 then subset 2 then test."""
        return [*self.subset1, *self.subset2, *self.test]

    def save(self, path: str | os.PathLike) -> None:
        """Write the split as JSON (atomically: a temporary name, then rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StackSplit:
        """Read a split written by :meth:`save`; a missing or malformed file raises a one-line ValueError."""
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"split file not found: {p}")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"split file {p} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        keys = ("subset1", "subset2", "test")
        if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in keys):
            raise ValueError(f"split file {p} must hold lists 'subset1', 'subset2' and 'test'")
        return cls(**{k: [str(x) for x in data[k]] for k in keys})


def split_stack(items: Iterable[str], subset1_size: int, test_fraction: float, seed: int) -> StackSplit:
    """Seeded, order-independent split of a stack into subset 1, subset 2 and test.

    Subset 1 gets exactly ``subset1_size`` items. The test set gets ``round(test_fraction * n)`` of the
    remaining items (n = all items), but never so many that subset 2 would be empty.

    Args:
        items: Item names; duplicates are an error. Their order does not matter.
        subset1_size: Images for rough masks + pix2pix (config ``data.subset1_size``).
        test_fraction: Held-out fraction of the whole stack (config ``data.test_fraction``).
        seed: Split seed (config ``data.seed``).

    Returns:
        The split; each list is sorted.
    """
    names = sorted(str(x) for x in items)
    if len(set(names)) != len(names):
        dupes = sorted({x for x in names if names.count(x) > 1})
        raise ValueError(f"stack lists duplicate items: {', '.join(dupes[:5])}")
    if subset1_size < 1:
        raise ValueError(f"subset 1 needs at least 1 image, got {subset1_size} (data.subset1_size)")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction={test_fraction} must be in [0, 1) (data.test_fraction)")
    n = len(names)
    if n < subset1_size + 1:
        raise ValueError(
            f"stack has {n} usable images; subset 1 needs {subset1_size} (data.subset1_size)"
            " and subset 2 at least 1"
        )
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [names[i] for i in order]
    rest = shuffled[subset1_size:]
    n_test = min(int(round(test_fraction * n)), len(rest) - 1)
    return StackSplit(
        subset1=sorted(shuffled[:subset1_size]),
        subset2=sorted(rest[n_test:]),
        test=sorted(rest[:n_test]),
    )
