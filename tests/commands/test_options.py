"""Options shared by the commands (commands/options.py): parsed values, sizes, and one-line errors."""

from __future__ import annotations

import sys

import pytest
from series_builders import make_runs

from dora_analysis.analysis import cluster as cl
from dora_analysis.analysis.series import analyze_series
from dora_analysis.commands.main import build_parser, main
from dora_analysis.commands.options import analysis_options
from dora_analysis.errors import InputError
from dora_analysis.readers import open_checkpoint

METHODS = ("ft", "lora", "dora")


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    base_dir, runs, _ = make_runs(tmp_path_factory.mktemp("options"))
    return base_dir, [runs[m] for m in METHODS]


@pytest.mark.slow
def test_cli_options_and_their_errors(tiny_runs, monkeypatch, capsys):
    base_dir, runs = tiny_runs
    parse = build_parser().parse_args
    assert parse(["series", "b", "r", "--cluster"]).cluster == "local"
    assert parse(["series", "b", "r", "--cluster", "auto"]).cluster == "auto"
    assert parse(["compare", "b", "t", "--cluster=10.0.0.1:6379"]).cluster == "10.0.0.1:6379"
    assert parse(["compare", "b", "t"]).cluster is None
    sized = analysis_options(parse(["series", "b", "r", "--cluster", "auto", "--task-mb", "8"]))["cluster"]
    assert sized == cl.Cluster(address="auto", group_bytes=8 << 20)
    assert analysis_options(parse(["series", "b", "r", "--cluster"]))["cluster"] == "local"
    with pytest.raises(InputError, match="not a Ray address"):
        cl.as_cluster("runs/ft")  # `series --cluster BASE RUN...` would take BASE as the address
    with open_checkpoint(base_dir) as reader, pytest.raises(InputError, match="not an open reader"):
        analyze_series(reader, runs, cluster=True)  # workers open the files: they need paths
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    assert main(["series", str(base_dir), str(runs[0]), "--cluster"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {cl.EXTRA}"]
    assert "dora-analysis[cluster]" in err[0]


def test_value_checks_accept_the_range_and_name_the_problem(tmp_path):
    import argparse

    from dora_analysis.commands.options import at_least, fraction, output_folder, positive_float, regex

    steps = at_least(1, 10)
    assert steps("3") == 3 and steps("10") == 10
    for bad, message in (("0", "at least 1"), ("11", "at most 10"), ("2.5", "whole number")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            steps(bad)
    assert positive_float("1e-4") == 1e-4
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            positive_float(bad)
    assert fraction("0") == 0.0 and fraction("0.5") == 0.5
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            fraction(bad)
    assert regex(r"layer\.\d+") == r"layer\.\d+"
    with pytest.raises(argparse.ArgumentTypeError, match="not a regular expression"):
        regex("(unclosed")
    assert output_folder(str(tmp_path / "new")) == tmp_path / "new"  # absent, in a folder that exists
    (tmp_path / "file").write_text("x")
    with pytest.raises(argparse.ArgumentTypeError, match="not a folder"):
        output_folder(str(tmp_path / "file"))
    with pytest.raises(argparse.ArgumentTypeError, match="does not exist"):
        output_folder(str(tmp_path / "missing" / "out"))
