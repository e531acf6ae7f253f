"""The wheel carries the whole program: every package and subpackage under
``bridge/``, ``adapters/`` and ``workers/``, and the management page's
templates and static files. ``pip install .`` (docker-compose.yml's image) is
a wheel install, where a missing subpackage only shows when a Matrix account
starts; the editable install the tests run on never notices."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_has_every_package_and_the_admin_pages_files(tmp_path: Path) -> None:
    # built from a copy: setuptools reuses a build/ directory, which would
    # carry what an earlier configuration packaged
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for top in ("bridge", "adapters", "workers"):
        shutil.copytree(ROOT / top, source / top, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    [wheel] = tmp_path.glob("talkbridge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        path.relative_to(ROOT).as_posix()
        for top in ("bridge", "adapters", "workers")
        for path in (ROOT / top).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    assert any(name.startswith("adapters/matrix/") for name in wanted)  # the tree is what we think it is
    assert "bridge/admin/templates/dashboard.html" in wanted
    missing = sorted(wanted - names)
    assert missing == [], f"not in the wheel: {missing}"
    assert (
        "talkbridge = bridge.cli:main"
        in zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    )
