"""The wheel holds every module of the source tree and each imports from the wheel alone
(an editable install would hide a subpackage missing from pyproject's package list)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = {"rosafx": "rosafx", "passes": "rosafx/passes", "kernels": "rosafx/kernels", "cli": "rosafx/cli"}


def source_modules() -> set[str]:
    modules = set()
    for folder, package in SOURCE_DIRS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = package.split("/") + list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.add(".".join(parts))
    return modules


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out)], check=True, capture_output=True, text=True)
    (path,) = out.glob("rosafx-*.whl")
    return path


def test_wheel_contains_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    in_wheel = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names if n.endswith(".py")}
    missing = source_modules() - in_wheel
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
    assert not any(n.split("/")[0] in ("passes", "kernels", "cli") for n in names), "top-level package squatting"


def test_every_module_imports_from_the_wheel(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    modules = sorted(source_modules())
    script = ("import importlib, sys\n"
              f"root = {str(tmp_path)!r}\n"
              f"for name in {modules!r}:\n"
              "    module = importlib.import_module(name)\n"
              "    assert module.__file__.startswith(root), (name, module.__file__)\n"
              "print('ok', len(sys.modules))\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
