"""ruff over the package, the tests and the notebooks is part of `make test`."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is not installed: run `make test` (it installs the [dev] extra)"
    result = subprocess.run([ruff, "check", "frcnn_tutorial", "tests", "notebooks"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, f"ruff found problems:\n{result.stdout}{result.stderr}"
