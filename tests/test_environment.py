"""environment.yml (conda) and pyproject.toml (pip) must name the same runtime packages."""

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    """'torch==2.14.1' -> 'torch'; names compared lower-case with - and _ folded."""
    name = re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0]
    return name.lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _conda_names() -> set[str]:
    names = set()
    for line in (ROOT / "environment.yml").read_text().splitlines():
        item = re.match(r"^\s*-\s+(?!-e\b)([A-Za-z0-9_.\-]+)", line)
        if item:
            names.add(_name(item.group(1)))
    return names


def test_environment_yml_names_every_runtime_dependency():
    missing = {_name(r) for r in _pyproject()["dependencies"]} - _conda_names()
    assert not missing, f"environment.yml lacks runtime dependencies of pyproject.toml: {sorted(missing)}"


def test_environment_yml_names_every_dev_tool():
    dev = {_name(r) for r in _pyproject()["optional-dependencies"]["dev"] if "python_version" not in r}
    missing = dev - _conda_names()
    assert not missing, f"environment.yml lacks dev tools of pyproject.toml: {sorted(missing)}"


def test_torch_pins_agree():
    pins = [r for r in _pyproject()["dependencies"] if _name(r) in ("torch", "torchvision")]
    text = (ROOT / "environment.yml").read_text()
    for pin in pins:
        assert pin in text, f"environment.yml must pin {pin} exactly as pyproject.toml does"


def test_name_parser_is_not_fooled():
    assert _name("torch==2.14.1") == "torch"
    assert _name("tomli>=2.0; python_version < '3.11'") == "tomli"
    assert _name("Pillow[extra]>=10") == "pillow"
