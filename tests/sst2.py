"""SST-2 sentences for the tests on real models: the shared data set where it is (a split's
``.tsv``), else the subset linft ships (``linft.cli.demo.sst2_demo``)."""

from __future__ import annotations

import csv
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"


def sst2_rows(split: str) -> list[tuple[str, int]]:
    """``(sentence, label)`` of every row of the split, or of the shipped subset."""
    path = SHARED / f"{split}.tsv"
    if path.is_file():
        with open(path, newline="") as fh:
            return [(r["sentence"], int(r["label"])) for r in csv.DictReader(fh, delimiter="\t")]
    from linft.cli.demo import sst2_demo

    texts, labels, _ = sst2_demo(128)
    return list(zip(texts, labels, strict=True))
