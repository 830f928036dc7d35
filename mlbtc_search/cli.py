"""The ``mlbtc`` command: the one place that wires the layers together.

Upper layers (trainers, studies, dashboard) are imported inside their subcommands, so
``mlbtc --help`` and ``mlbtc inspect`` stay fast and need only the core.
Errors the user can fix print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import MlbtcError

EXIT_USAGE = 2


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """``"studies.cli:search"`` -> a runner that imports the module only when called."""

    def run(args: argparse.Namespace) -> int:
        module, func = target.split(":")
        return getattr(importlib.import_module(module), func)(args)

    return run


def _storage(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", metavar="URL",
                   help="study storage URL (sqlite:///path.db or postgresql://...); default: "
                        "the MLBTC_STORAGE environment variable, else sqlite:///mlbtc.db in "
                        "the working directory (the same for every command)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlbtc",
        description="Architecture search over structured (MLBTC) attention: inspect specs, "
                    "train under a FLOP budget, search, browse the Pareto front, export.",
        epilog="Run 'mlbtc COMMAND --help' for the options of each command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("inspect", help="params, FLOPs, rank and contraction graph of a spec",
                       description="Inspect a matrix spec (params, FLOPs per vector, numerical "
                                   "rank, contraction order, graph) or a model spec (per-layer "
                                   "params, FLOPs per token, KV-cache bytes per token).")
    p.add_argument("file", help="a matrix or model spec YAML file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--seq-len", type=int, help="sequence length for a model's FLOPs "
                                               "(default: the model's max_seq_len)")
    p.set_defaults(run=_lazy("mlbtc_search.inspect:run"))

    p = sub.add_parser("train", help="train a model spec under a FLOP budget",
                       description="Train MODEL.yaml on a task for the number of steps the "
                                   "budget buys at the model's own cost. The last stdout line "
                                   "is one JSON object with the results.")
    p.add_argument("model", help="model spec YAML (or an exported architecture.yaml)")
    p.add_argument("--task", help="icl_regression | text | timeseries (default: the "
                                  "task recorded in the file, else icl_regression)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. n_dims=16 or path=data.txt (repeatable)")
    p.add_argument("--budget", type=float, required=True, help="training FLOPs, e.g. 1e12")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="base learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, help="batch size (default 64)")
    p.add_argument("--out", metavar="DIR", help="write architecture, weights and metrics here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=_lazy("trainers.cli:train"))

    p = sub.add_parser("search", help="run (or resume) a search from a search-space YAML",
                       description="Sample architectures with Optuna, train each under the "
                                   "fixed budget on Ray workers, record them in the storage. "
                                   "Running it again resumes the study.")
    p.add_argument("space", help="search-space YAML file")
    p.add_argument("--workers", type=int, help="parallel trials (default: from the file)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. 127.0.0.1:6379)")
    _storage(p)
    p.add_argument("--trials", type=int, help="number of trials (default: from the file)")
    p.add_argument("--name", help="study name (default: from the file)")
    p.add_argument("--budget", type=float, help="training FLOPs per trial, e.g. 2e9 for a smoke "
                                                "run (default: from the file)")
    p.add_argument("--seeds", type=int, help="seeds per architecture; the loss objective is "
                                             "their mean (default: from the file, else 1)")
    p.set_defaults(run=_lazy("studies.cli:search"))

    p = sub.add_parser("studies", help="list the studies in a storage")
    _storage(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_lazy("studies.cli:studies"))

    p = sub.add_parser("pareto", help="the non-dominated trials of a study and its hypervolume")
    p.add_argument("study", help="study name")
    _storage(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of trials")
    p.set_defaults(run=_lazy("studies.cli:pareto"))

    p = sub.add_parser("importance", help="which parameters and structure descriptors matter, "
                                          "for loss and for FLOPs (PED-ANOVA)")
    p.add_argument("study", help="study name")
    _storage(p)
    p.add_argument("--top", type=int, default=10, help="rows per objective (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_lazy("studies.cli:importance"))

    p = sub.add_parser("export", help="export a trial's architecture and weights to a directory")
    p.add_argument("study", help="study name")
    _storage(p)
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=int, help="trial number")
    pick.add_argument("--pick", help="min-loss | knee | 'flops<=X'")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory")
    p.add_argument("--format", choices=["safetensors", "exported-program", "onnx"],
                   default="safetensors", help="extra model format besides safetensors")
    p.set_defaults(run=_lazy("studies.cli:export"))

    p = sub.add_parser("dashboard", help="browse studies and Pareto fronts in the browser")
    _storage(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log every HTTP request (as mlbtc -v dashboard)")
    p.set_defaults(run=_lazy("dashboard.cli:serve"))
    return parser


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, allow_nan=False, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except MlbtcError as err:
        sys.stderr.write(f"mlbtc {args.command}: error: {' '.join(str(err).split())}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write(f"mlbtc {args.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
