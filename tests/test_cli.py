"""The `mrpo` console script: help and version work from an installed package."""

import subprocess
import sys

from mrpo import __version__
from mrpo.cli import main


def test_version_and_help(capsys):
    try:
        main(["--version"])
    except SystemExit as stop:
        assert stop.code == 0
    assert capsys.readouterr().out.strip() == f"mrpo {__version__}"
    assert main([]) == 0
    assert "Multi-Reference Preference Optimization" in capsys.readouterr().out


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "mrpo.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "usage: mrpo" in result.stdout
