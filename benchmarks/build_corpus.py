"""Write a text corpus built from the installed Python to one file, and print its size and SHA-256.

The corpus is the one the text task builds with option ``corpus`` (trainers/tasks/corpus.py):
``stdlib`` (default here) is CPython's documentation topics plus the standard library's sources in
sorted order, about 32 MB on CPython 3.11. The file lets other tools (or a machine with another
Python) train on the same bytes: ``task: {name: text, options: {path: FILE}}``.

    python benchmarks/build_corpus.py --out benchmarks/out/stdlib_corpus.txt
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainers.tasks.corpus import CORPORA, corpus, describe  # noqa: E402


def build(name: str, out: Path) -> dict[str, object]:
    """Write corpus ``name`` to ``out``; returns its description (bytes, sha256, python)."""
    data = corpus(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return {"corpus": name, "path": str(out), **describe(data),
            "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", choices=CORPORA, default="stdlib")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "stdlib_corpus.txt")
    args = ap.parse_args(argv)
    info = build(args.corpus, args.out)
    print(f"{info['corpus']} corpus: {info['bytes']:,} bytes, sha256 {info['sha256']}, "
          f"Python {info['python']} -> {info['path']}", file=sys.stderr)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
