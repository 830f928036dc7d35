"""The ``mlbtc`` command: the one place that wires the layers together.

Upper layers (trainers, studies, dashboard) are imported inside their subcommands, so
``mlbtc --help`` and ``mlbtc inspect`` stay fast and need only the core.
Errors the user can fix print one line to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .errors import MlbtcError

EXIT_USAGE = 2


class _ArgumentError(Exception):
    """A command-line usage error, reported by :func:`main` as one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (``mlbtc train: error: --budget must be ... (see
    'mlbtc train --help')``, exit code 2) instead of the whole usage block."""

    def error(self, message: str) -> Any:
        text = re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1 ", " ".join(message.split()))
        raise _ArgumentError(f"{self.prog}: error: {text} (see '{self.prog} --help')")


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (errors are one line, exit 2)."""
    valid = f"an integer >= {low}" if high is None else f"an integer {low}-{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {valid}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {valid}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0 (``1e12``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number (e.g. 1e12), got {text!r}"
                                         ) from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


_port = _int_at_least(1, 65535)
_count = _int_at_least(1)
_index = _int_at_least(0)


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
    parser = _Parser(
        prog="mlbtc",
        description="Architecture search over structured (MLBTC) attention: inspect specs, "
                    "train under a FLOP budget, search, browse the Pareto front, export.",
        epilog="Run 'mlbtc COMMAND --help' for the options of each command.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    # -v also after the command (`mlbtc dashboard -v`); SUPPRESS keeps `mlbtc -v CMD` working
    verbose = _Parser(add_help=False)
    verbose.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                         help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=_Parser)
    command = functools.partial(sub.add_parser, parents=[verbose])
    for add in (_inspect, _train, _search, _studies, _pareto, _importance, _export, _scaling,
                _dashboard):
        add(command)
    return parser


def _inspect(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("inspect", help="params, FLOPs, rank and contraction graph of a spec",
                description="Inspect a matrix spec (params, FLOPs per vector, numerical "
                            "rank, contraction order, graph) or a model spec (per-layer "
                            "params, FLOPs per token, KV-cache bytes per token).")
    p.add_argument("file", help="a matrix or model spec YAML file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--seq-len", type=_count, help="sequence length for a model's FLOPs "
                                               "(default: the model's max_seq_len)")
    p.set_defaults(run=_lazy("mlbtc_search.inspect:run"))


def _train(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("train", help="train a model spec under a FLOP budget",
                description="Train MODEL.yaml on a task for the number of steps the "
                            "budget buys at the model's own cost. The last stdout line "
                            "is one JSON object with the results.")
    p.add_argument("model", help="model spec YAML (or an exported architecture.yaml)")
    p.add_argument("--task", help="icl_regression | text | timeseries (default: the "
                                  "task recorded in the file, else icl_regression)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help="task option, e.g. n_dims=16 or path=data.txt (repeatable)")
    p.add_argument("--budget", type=_positive_float, required=True,
                   help="training FLOPs, e.g. 1e12")
    p.add_argument("--seed", type=_index, default=0,
                   help="seed of the weights and the training data (default 0)")
    p.add_argument("--lr", type=_positive_float, help="base learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=_count, help="batch size (default 64)")
    p.add_argument("--device", help="cpu | cuda | cuda:N | auto (default cpu; auto: CUDA if "
                                    "there is a GPU); CUDA runs use bf16 autocast")
    p.add_argument("--autocast", choices=["auto", "bf16", "off"],
                   help="bf16 autocast of the forward pass (default auto: on for CUDA only)")
    p.add_argument("--compile", nargs="?", const="default", metavar="MODE",
                   choices=["default", "reduce-overhead", "max-autotune"],
                   help="torch.compile the model (MODE: default | reduce-overhead (CUDA graphs) "
                        "| max-autotune); off by default")
    p.add_argument("--out", metavar="DIR",
                   help="new or empty directory for architecture.yaml, model.safetensors, "
                        "metrics.json and curve.csv (created after the run; without it nothing "
                        "is saved)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(run=_lazy("trainers.cli:train"))


def _search(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("search", help="run (or resume) a search from a search-space YAML",
                description="Sample architectures with Optuna, train each under the "
                            "fixed budget on Ray workers, record them in the storage. "
                            "Running it again resumes the study.")
    p.add_argument("space", help="search-space YAML file")
    p.add_argument("--workers", type=_count, help="parallel trials (default: from the file)")
    p.add_argument("--address", help="join an existing Ray cluster (e.g. 127.0.0.1:6379)")
    _storage(p)
    p.add_argument("--trials", type=_count, help="number of trials (default: from the file)")
    p.add_argument("--name", help="study name (default: from the file)")
    p.add_argument("--budget", type=_positive_float,
                   help="training FLOPs per trial, e.g. 2e10 for a smoke run (default: from "
                        "the file)")
    p.add_argument("--seeds", type=_count, help="seeds per architecture; the loss objective is "
                                                "their mean (default: from the file, else 1)")
    p.set_defaults(run=_lazy("studies.cli:search"))


def _studies(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("studies", help="list the studies in a storage")
    _storage(p)
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(run=_lazy("studies.cli:studies"))


def _pareto(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("pareto", help="the non-dominated trials of a study and its hypervolume")
    p.add_argument("study", help="study name")
    _storage(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of trials")
    p.set_defaults(run=_lazy("studies.cli:pareto"))


def _importance(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("importance", help="which parameters and structure descriptors matter, for "
                                   "loss and for FLOPs (PED-ANOVA)")
    p.add_argument("study", help="study name")
    _storage(p)
    p.add_argument("--top", type=_count, default=10, help="rows per objective (default 10)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=_lazy("studies.cli:importance"))


def _export(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("export", help="export a trial's architecture and weights to a directory")
    p.add_argument("study", help="study name")
    _storage(p)
    pick = p.add_mutually_exclusive_group(required=True)
    pick.add_argument("--trial", type=_index, help="trial number")
    pick.add_argument("--pick", help="min-loss | knee | 'flops<=X'")
    p.add_argument("--out", required=True, metavar="DIR", help="new (or empty) directory")
    p.add_argument("--format", choices=["safetensors", "exported-program", "onnx"],
                   default="safetensors", help="extra model format besides safetensors")
    p.set_defaults(run=_lazy("studies.cli:export"))


def _scaling(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("scaling", help="scaling laws L(C) = E + A C^-alpha of a multi-fidelity study")
    p.add_argument("study", help="study name")
    _storage(p)
    p.add_argument("--at", type=_positive_float, metavar="FLOPS",
                   help="training budget to predict at (default: 10 x the largest budget)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=_lazy("studies.scaling_cli:scaling"))


def _dashboard(command: Callable[..., argparse.ArgumentParser]) -> None:
    p = command("dashboard", help="browse studies and Pareto fronts in the browser")
    _storage(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8050,
                   help="TCP port 1-65535 (default 8050)")
    p.set_defaults(run=_lazy("dashboard.cli:serve"))


def print_json(obj: Any) -> None:
    """One line of strict JSON on stdout (NaN and infinities as null)."""
    from .yamlio import json_safe

    sys.stdout.write(json.dumps(json_safe(obj), allow_nan=False, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as err:
        sys.stderr.write(f"{err}\n")
        return EXIT_USAGE
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
