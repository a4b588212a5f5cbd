"""The installed distribution: one `dinoseek` namespace, migrations found as package resources."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    return next(out.glob("dinoseek-*.whl"))


def test_the_wheel_installs_nothing_but_the_dinoseek_namespace(wheel):
    top_level = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"dinoseek"}
    names = zipfile.ZipFile(wheel).namelist()
    for package in ("model", "indexer", "retrieval", "migrations"):
        for module in (REPO / package).rglob("*.py"):  # every module, subpackages included
            assert f"dinoseek/{module.relative_to(REPO).as_posix()}" in names
    assert "dinoseek/migrations/script.py.mako" in names
    assert any(n.startswith("dinoseek/migrations/versions/0001") for n in names)


def test_an_installed_copy_imports_as_dinoseek_and_migrates_a_new_catalog(wheel, tmp_path):
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                              str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    code = f"""
import importlib.util, sys
from pathlib import Path
from sqlalchemy import create_engine
from dinoseek.retrieval import open_library
from dinoseek.indexer import migrate
import dinoseek.migrations
assert Path(dinoseek.migrations.__file__).is_relative_to({str(target)!r}), dinoseek.migrations.__file__
for generic in ("model", "indexer", "retrieval", "migrations"):
    assert importlib.util.find_spec(generic) is None, generic
engine = create_engine("sqlite:///" + {str(tmp_path / 'c.sqlite')!r})
assert migrate.upgrade(engine, None) is True and migrate.at_head(engine)
print("ok")
"""
    # Only the installed copy and the dependencies: no repository folder on the path, run from elsewhere.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *deps]), "PYTHONSAFEPATH": "1"}
    result = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd=tmp_path,
                            env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
