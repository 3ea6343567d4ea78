"""The ``pifa`` command line: help, argument errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pifa_modifier import cli
from pifa_modifier.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "export-dense", "compress", "eval", "inspect", "bench"):
        assert command in out


@pytest.mark.parametrize(
    "command, option",
    [("compress", "--num-samples"), ("eval", "--tasks"), ("inspect", "dir"), ("bench", "which")],
)
def test_subcommand_help(command, option, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert option in capsys.readouterr().out


def test_bench_runs_the_script_with_the_remaining_args(monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    assert main(["bench", "linear", "--device", "cpu", "--help"]) == 3  # child's exit code
    script = cli.benchmarks_dir() / "bench_linear.py"
    assert script.is_file()
    assert calls == [[sys.executable, str(script), "--device", "cpu", "--help"]]


def test_bench_outside_a_checkout(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "quality"]) == 2
    assert "quality.py not found" in capsys.readouterr().err


def test_unknown_command_exits_2():
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


def test_demo_refuses_missing_recipe(tmp_path, capsys):
    code = main(["demo", "--recipe", str(tmp_path / "nope.yaml"), "--output", str(tmp_path)])
    assert code == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_export_dense_bad_source(tmp_path, capsys):
    code = main(["export-dense", str(tmp_path / "missing"), str(tmp_path / "dst")])
    assert code == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "pifa_modifier", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "export-dense" in proc.stdout
