"""Write the example's teacher (teacher.pt2) and transfer set (digits.npz) beside this file.

The teacher is the one `distill demo` uses: a small CNN trained on sklearn's digits (about 97%
validation accuracy, about ten seconds on a laptop CPU), saved with ``torch.export`` with a
dynamic batch dimension. The transfer set keeps every training image (1,258 of the 1,797) but
only ``--labelled`` of their labels (the others are -1), plus a labelled validation split.
See ``make_files`` in ``cli/digits.py`` for the recipe.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.digits import make_files

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the two files")
    parser.add_argument("--labelled", type=int, default=100, help="training labels to keep")
    args = parser.parse_args()
    teacher, data, accuracy = make_files(args.out, labelled=args.labelled)
    print(f"teacher validation accuracy {accuracy:.3f}; wrote {teacher} and {data}")


if __name__ == "__main__":
    main()
