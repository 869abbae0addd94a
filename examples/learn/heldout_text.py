"""Writes a held-out text for `folojax perplexity`: the Python reference manual's topics
(pydoc_data, which `folojax quantize` leaves out of its calibration text), the same text as
docs/BENCHMARKS.md's perplexity figures.

    python examples/learn/heldout_text.py --out heldout.txt [--chars 50000]
"""

import argparse
from pydoc_data.topics import topics


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the file to write")
    parser.add_argument("--chars", type=int, default=50000, help="characters kept")
    args = parser.parse_args(argv)
    text = "\n\n".join(topics[key] for key in sorted(topics))[:args.chars]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {len(text)} characters to {args.out}")


if __name__ == "__main__":
    main()
