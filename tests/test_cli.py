"""The ``pifa`` command line: help, argument errors and exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pifa_modifier.cli import main


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "export-dense" in out


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
