"""Invalid matrix specs: every error names the field path and what must hold (STYLE rule 13).

Each case gives a YAML document and a regex that must match the message; the field path is part of
the contract (``at levels[0].low_rank.rank: rank must be >= 1 ...``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlbtc_search import MatrixSpec, SpecError
from mlbtc_search.errors import UsageError
from mlbtc_search.yamlio import load_yaml, parse_yaml


def btc_level(**btc) -> dict:
    return {"in": 64, "out": 64, "levels": [{"blocks": 1, "btc": btc}]}


CASES = {
    # ranks
    "rank below 1": (
        {"in": 64, "out": 64, "levels": [{"blocks": 1, "low_rank": {"rank": 0}}]},
        r"levels\[0\]\.low_rank\.rank: rank must be >= 1 and <= 64 .*got rank=0",
    ),
    "low rank above min(n, m)": (
        {"in": 64, "out": 16, "low_rank": {"rank": 32}},
        r"at low_rank\.rank: rank must be >= 1 and <= 16 \(min\(in, out\)\), got rank=32",
    ),
    "btt rank below 1": (
        {"in": 64, "out": 64, "btt": {"rank": -2}},
        r"at btt\.rank: rank must be >= 1, got rank=-2",
    ),
    "mlr rank above the block size": (
        {"in": 64, "out": 64, "mlr": {"ranks": [4, 40], "blocks": [1, 2]}},
        r"at mlr\.ranks\[1\]\.rank: rank must be >= 1 and <= 32",
    ),
    "tensor train bond rank": (
        {"in": 64, "out": 64, "levels": [{"blocks": 2, "tensor_train": {"ranks": [2, 0]}}]},
        r"at levels\[0\]\.tensor_train\.ranks\[1\]: ranks\[1\] must be an integer >= 1, got 0",
    ),
    # factors and blocks
    "in factors do not multiply to n": (
        {"in": 64, "out": 64, "btt": {"in_factors": [4, 8]}},
        r"at btt\.in_factors: the product of in_factors must be 64, got \[4, 8\]",
    ),
    "out factors do not multiply to m": (
        {"in": 64, "out": 32, "levels": [{"kronecker": {"out_factors": [4, 4]}}]},
        r"at levels\[0\]\.kronecker\.out_factors: the product of out_factors must be 32",
    ),
    "factors per block": (
        {"in": 64, "out": 64, "blocks": 2, "btt": {"in_factors": [8, 8]}},
        r"at btt\.in_factors: the product of in_factors must be 32",
    ),
    "blocks do not divide": (
        {"in": 64, "out": 64, "levels": [{"blocks": 3, "dense": {}}]},
        r"at levels\[0\]\.blocks: blocks must divide in=64 and out=64, got blocks=3",
    ),
    "mlr blocks do not divide": (
        {"in": 64, "out": 48, "mlr": {"ranks": [2, 2], "blocks": [1, 32]}},
        r"at mlr\.blocks\[1\]: blocks must divide in=64 and out=48, got blocks=32",
    ),
    "block_diag blocks do not divide": (
        {"in": 64, "out": 64, "block_diag": {"blocks": 5}},
        r"at block_diag\.blocks: blocks must divide",
    ),
    "btc axes do not multiply to the block size": (
        {
            "in": 64,
            "out": 64,
            "levels": [
                {
                    "blocks": 2,
                    "btc": {"in_axes": {"i": 64}, "out_axes": {"o": 32}, "cores": [["i", "o"]]},
                }
            ],
        },
        r"at levels\[0\]: the input axes must multiply to in/blocks=32",
    ),
    # contraction graphs
    "axis used by no core": (
        btc_level(in_axes={"i": 8, "j": 8}, out_axes={"o": 64}, cores=[["i", "o"]]),
        r"at levels\[0\]\.btc\.in_axes\.j: axis 'j' is used by no core",
    ),
    "bond used by one core": (
        btc_level(in_axes={"i": 64}, out_axes={"o": 64}, bonds={"r": 2}, cores=[["i", "o", "r"]]),
        r"at levels\[0\]\.btc\.bonds\.r: bond 'r' is used by only one core",
    ),
    "disconnected graph": (
        btc_level(
            in_axes={"i": 64}, out_axes={"o": 64}, bonds={"r": 2}, cores=[["i", "o"], ["r"], ["r"]]
        ),
        r"at levels\[0\]\.btc\.cores: the contraction graph is disconnected: cores \[1, 2\]",
    ),
    "duplicate axis names": (
        btc_level(in_axes={"i": 64}, out_axes={"i": 64}, cores=[["i"]]),
        r"at levels\[0\]\.btc\.out_axes\.i: axis 'i' is declared twice",
    ),
    "duplicate axis names in pair form": (
        btc_level(in_axes=[["i", 8], ["i", 8]], out_axes={"o": 64}, cores=[["i", "o"]]),
        r"at levels\[0\]\.btc\.in_axes\.i: axis 'i' is declared twice",
    ),
    "core lists an unknown axis": (
        btc_level(in_axes={"i": 64}, out_axes={"o": 64}, cores=[["i", "o", "q"]]),
        r"at levels\[0\]\.btc\.cores\[0\]: unknown axis 'q'",
    ),
    "core lists an axis twice": (
        btc_level(in_axes={"i": 64}, out_axes={"o": 64}, cores=[["i", "o", "i"]]),
        r"at levels\[0\]\.btc\.cores\[0\]: a core lists an axis twice",
    ),
    "axis name not an identifier": (
        btc_level(in_axes={"i j": 64}, out_axes={"o": 64}, cores=[["i j", "o"]]),
        r"at levels\[0\]\.btc\.in_axes: axis names must be identifiers",
    ),
    "btc missing cores": (
        btc_level(in_axes={"i": 64}, out_axes={"o": 64}),
        r"at levels\[0\]\.btc: missing key 'cores'",
    ),
    # unknown names
    "unknown preset at the top": (
        {"in": 64, "out": 64, "fancy": {}},
        r"at fancy: unknown key 'fancy'; valid keys are .*'low_rank'",
    ),
    "unknown preset in a level": (
        {"in": 64, "out": 64, "levels": [{"dense": {}}, {"blocks": 2, "lowrank": {}}]},
        r"at levels\[1\]\.lowrank: unknown key 'lowrank'",
    ),
    "unknown preset parameter": (
        {"in": 64, "out": 64, "low_rank": {"rank": 2, "rnk": 3}},
        r"at low_rank\.rnk: unknown key 'rnk' for low_rank; valid keys: rank",
    ),
    "unknown key in a btc": (
        {
            "in": 64,
            "out": 64,
            "levels": [
                {
                    "btc": {
                        "in_axes": {"i": 64},
                        "out_axes": {"o": 64},
                        "cores": [["i", "o"]],
                        "core": [],
                    }
                }
            ],
        },
        r"at levels\[0\]\.btc\.core: unknown key 'core'",
    ),
    "unknown key in mlr": (
        {"in": 64, "out": 64, "mlr": {"ranks": [2], "rank": 2}},
        r"at mlr\.rank: unknown key 'rank'; mlr takes ranks and blocks",
    ),
    "blocks beside levels": (
        {"in": 64, "out": 64, "blocks": 2, "levels": [{"dense": {}}]},
        r"at blocks: blocks goes inside levels",
    ),
    "two structures": (
        {"in": 64, "out": 64, "dense": {}, "monarch": {}},
        r"give exactly one of levels, mlr, block_diag or a structure key",
    ),
    "a level without a structure": (
        {"in": 64, "out": 64, "levels": [{"blocks": 2}]},
        r"at levels\[0\]: a level needs exactly one structure",
    ),
    "missing in": ({"out": 64, "dense": {}}, r"missing 'in'"),
    "low_rank without rank": (
        {"in": 64, "out": 64, "low_rank": {}},
        r"at low_rank: low_rank needs 'rank'",
    ),
    # wrong types
    "string rank": (
        {"in": 64, "out": 64, "levels": [{"low_rank": {"rank": "4"}}]},
        r"at levels\[0\]\.low_rank\.rank: rank must be an integer >= 1, got '4'",
    ),
    "boolean rank": (
        {"in": 64, "out": 64, "low_rank": {"rank": True}},
        r"at low_rank\.rank: rank must be an integer >= 1, got True",
    ),
    "string size": (
        {"in": "64", "out": 64, "dense": {}},
        r"at in: in must be an integer >= 1, got '64'",
    ),
    "list where parameters mapping expected": (
        {"in": 64, "out": 64, "low_rank": [4]},
        r"at low_rank: low_rank takes a mapping of parameters \['rank'\], got \[4\]",
    ),
    "list where level mapping expected": (
        {"in": 64, "out": 64, "levels": [[1, 2]]},
        r"at levels\[0\]: a level must be a mapping",
    ),
    "mapping where levels list expected": (
        {"in": 64, "out": 64, "levels": {"dense": {}}},
        r"at levels: levels must be a non-empty list",
    ),
    "string axis size": (
        btc_level(
            in_axes={"i": 64}, out_axes={"o": 64}, bonds={"r": "a"}, cores=[["i", "r"], ["r", "o"]]
        ),
        r"at levels\[0\]\.btc\.bonds\.r: axis size must be an integer >= 1, got 'a'",
    ),
    "list where axes mapping expected": (
        btc_level(in_axes=[64], out_axes={"o": 64}, cores=[["i", "o"]]),
        r"at levels\[0\]\.btc\.in_axes: in_axes must be a mapping of axis name to size",
    ),
    "cores not a list of lists": (
        btc_level(in_axes={"i": 64}, out_axes={"o": 64}, cores=["i", "o"]),
        r"at levels\[0\]\.btc\.cores: cores must be a list of lists of axis names",
    ),
    "factors not integers": (
        {"in": 64, "out": 64, "btt": {"in_factors": [8.0, 8]}},
        r"at btt\.in_factors: in_factors must be a list of positive integers",
    ),
    "matrix not a mapping": ([1, 2, 3], r"a matrix spec must be a mapping"),
    # tensor train and theta
    "tensor train with one core": (
        {"in": 64, "out": 64, "tensor_train": {"cores": 1}},
        r"at tensor_train\.cores: cores must be an integer between 2 and 12, got 1",
    ),
    "tensor train ranks of the wrong length": (
        {"in": 64, "out": 64, "tensor_train": {"cores": 3, "ranks": [2]}},
        r"at tensor_train\.ranks: ranks must be an integer or a list of 2 integers",
    ),
    "theta input exponents do not sum to 1": (
        {"in": 64, "out": 64, "theta": {"exponents": [0.5, 0.5, 0.5, 0.5, 0.5, 0, 0]}},
        r"at theta\.exponents: .*must each sum to 1, got 1\.500 and 1\.000",
    ),
    "theta output exponents do not sum to 1 (string form)": (
        {"in": 64, "out": 64, "levels": [{"theta": "(0.5|0.25|0.25|0.5|0.25|0|0)"}]},
        r"at levels\[0\]\.theta\.exponents: .*must each sum to 1, got 1\.000 and 0\.750",
    ),
    "theta with six exponents": (
        {"in": 64, "out": 64, "theta": {"exponents": [0.5, 0.5, 0, 1, 0, 0]}},
        r"at theta\.exponents: theta needs 7 exponents in \[0, 1\]",
    ),
    "theta exponent above 1": (
        {"in": 64, "out": 64, "theta": {"exponents": [1.5, -0.5, 0, 1, 0, 0, 0]}},
        r"at theta\.exponents: theta needs 7 exponents in \[0, 1\]",
    ),
}


@pytest.mark.parametrize("doc,match", CASES.values(), ids=list(CASES))
def test_invalid_spec(doc, match):
    with pytest.raises(SpecError, match=match):
        MatrixSpec.from_dict(doc)


def test_error_carries_its_path():
    with pytest.raises(SpecError) as info:
        MatrixSpec.from_dict({"in": 64, "out": 64, "mlr": {"ranks": [4, 0]}})
    assert info.value.path == ("mlr", "ranks", 1, "rank")


def test_context_fixes_the_dimensions():
    spec = MatrixSpec.from_dict({"dense": {}}, n_in=8, n_out=4)
    assert (spec.n_in, spec.n_out) == (8, 4)
    with pytest.raises(SpecError, match=r"at attn\.q\.in: in must be 8 here"):
        MatrixSpec.from_dict({"in": 16, "dense": {}}, path=("attn", "q"), n_in=8, n_out=4)


BAD_FILE = """\
# a matrix with a bad rank on line 6
in: 256
out: 256
levels:
  - blocks: 2
    low_rank: {rank: 0}
"""


def test_yaml_file_error_names_file_and_line(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_FILE)
    doc = load_yaml(path)
    with pytest.raises(SpecError) as info:
        MatrixSpec.from_dict(doc.data)
    located = doc.locate(info.value)
    assert str(located).startswith(f"at {path}:6 levels[0].low_rank.rank: rank must be >= 1")


def test_yaml_file_error_on_a_nested_btc(tmp_path: Path):
    path = tmp_path / "graph.yaml"
    path.write_text(
        "in: 64\nout: 64\nlevels:\n  - btc:\n      in_axes: {i: 8, j: 8}\n"
        "      out_axes: {o: 64}\n      cores:\n        - [i, o]\n"
    )
    doc = load_yaml(path)
    with pytest.raises(SpecError) as info:
        MatrixSpec.from_dict(doc.data)
    assert str(doc.locate(info.value)).startswith(
        f"at {path}:5 levels[0].btc.in_axes.j: axis 'j' is used by no core"
    )


def test_invalid_yaml_syntax_names_file_and_line(tmp_path: Path):
    path = tmp_path / "broken.yaml"
    path.write_text("in: 64\nout: 64\ndense: {\n  rank: [1, 2\n")
    with pytest.raises(SpecError, match=rf"at {path}:\d+: invalid YAML"):
        load_yaml(path)


def test_yaml_rejects_code_tags():
    with pytest.raises(SpecError, match=r"at <string>:1: invalid YAML"):
        parse_yaml("in: !!python/object/apply:os.system ['true']\n")


def test_missing_file_is_a_usage_error(tmp_path: Path):
    with pytest.raises(UsageError, match=r"file not found: .*nope\.yaml"):
        load_yaml(tmp_path / "nope.yaml")


def test_duplicate_yaml_keys_are_errors_with_both_lines(tmp_path):
    from mlbtc_search.yamlio import load_yaml

    path = tmp_path / "dup.yaml"
    path.write_text("in: 64\nout: 64\ndense: {}\nout: 32\n")
    with pytest.raises(SpecError, match=r"dup\.yaml:4 out: duplicate key 'out' \(first given on "
                                         r"line 2\)"):
        load_yaml(path)
