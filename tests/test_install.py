"""Installing: `pip install .` refuses in one line (a clone-and-run repository), and contributors get the linter CI
runs from requirements-dev.txt."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import pip_backend  # noqa: E402 -- the in-tree build backend pyproject.toml names


def test_pip_install_refuses_in_one_line_saying_what_to_run_and_installs_nothing(tmp_path):
    target = tmp_path / "site-packages"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                             "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert pip_backend.MESSAGE in output and "[1 lines of output]" in output, output
    assert "pip install -r requirements.txt" in pip_backend.MESSAGE
    assert not target.exists()


def test_contributors_install_the_ruff_ci_lints_with():
    lines = (REPO / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in lines
    assert [line for line in lines if re.fullmatch(r"ruff==[\d.]+", line)]
    assert "pip install -r requirements-dev.txt && ruff check ." in (REPO / ".ci" / "run").read_text()
    assert "pip install -r requirements-dev.txt" in (REPO / "README.md").read_text()
