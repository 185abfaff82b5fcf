"""pyproject.toml names only package data that exists, and every data file the package reads is named."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_patterns_match_files_and_cover_the_task_yamls():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["mrpo"]
    package = ROOT / "src" / "mrpo"
    shipped = set()
    for pattern in patterns:
        matches = list(package.glob(pattern))
        assert matches, f"package-data pattern {pattern!r} matches no file"
        shipped.update(matches)
    data_files = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert data_files <= shipped, f"not shipped: {sorted(str(p) for p in data_files - shipped)}"


def test_import_mrpo_stays_light_and_build_trainer_loads_on_first_use():
    import subprocess
    import sys

    script = (
        "import sys, mrpo; heavy = sorted({'torch', 'transformers', 'datasets'} & set(sys.modules)); "
        "assert not heavy, heavy; from mrpo import build_trainer; assert callable(build_trainer); "
        "assert 'build_trainer' in mrpo.__all__"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=ROOT)
