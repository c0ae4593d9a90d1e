"""Write N generated, labelled text rows (TSV: sentence, label) for the scale benchmark.

Sentences are drawn, with a fixed seed, from a small vocabulary of neutral words and
sentiment words; the label is the sign of the sentiment words' sum, so a classifier has
something to learn. Lengths follow a skewed distribution like SST-2's (mean about 10 words,
from 2 to 52), so the encoder sees SST-2-like token counts. Rows are written in blocks: the
generator's memory does not grow with N.

    python bench/generate_rows.py 1000000 /tmp/rows-1m.tsv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

NEUTRAL = (
    "the a an this that film movie story plot actor actress director scene scenes script "
    "character characters music score camera audience ending beginning middle hour minutes "
    "of in on with about for from by as at to and but or yet while its their his her "
    "is was are were seems feels looks becomes remains plays takes makes gives "
    "one two first last new old long short big small whole entire every other own "
    "comedy drama thriller romance documentary sequel remake cast performance dialogue "
    "tone pace style humor heart mind eyes world life time way moments screen"
).split()
POSITIVE = (
    "good great fine wonderful brilliant moving charming funny delightful smart sharp "
    "beautiful touching gripping clever warm engaging memorable superb fresh lovely"
).split()
NEGATIVE = (
    "bad dull boring tedious awful weak flat clumsy messy stupid lifeless tired "
    "predictable pointless annoying bland hollow sloppy forgettable painful ugly"
).split()
BLOCK = 50_000


def block(rng: np.random.Generator, rows: int) -> list[str]:
    """``rows`` lines 'sentence<TAB>label'."""
    lengths = np.clip(rng.gamma(2.2, 4.6, size=rows).astype(int) + 2, 2, 52)
    lines = []
    for length in lengths:
        sentiment = rng.integers(1, 4)
        signs = rng.choice((-1, 1), size=sentiment)
        words = list(rng.choice(NEUTRAL, size=max(int(length) - int(sentiment), 1)))
        for sign in signs:
            pool = POSITIVE if sign > 0 else NEGATIVE
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(pool)))
        label = 1 if signs.sum() > 0 else 0
        lines.append(f"{' '.join(words)}\t{label}")
    return lines


def generate(rows: int, path: Path, seed: int = 0) -> Path:
    """Write ``rows`` generated rows to ``path`` (atomically: a partial file never remains)."""
    rng = np.random.default_rng(seed)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        out.write("sentence\tlabel\n")
        for start in range(0, rows, BLOCK):
            out.write("\n".join(block(rng, min(BLOCK, rows - start))) + "\n")
    partial.replace(path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=int)
    parser.add_argument("path", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.rows, args.path, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
