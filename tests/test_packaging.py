"""The wheel carries the whole program: every package and subpackage under
``bridge/``, ``adapters/`` and ``workers/``, and the management page's
templates and static files. ``pip install .`` (the image docker-compose.yml
builds, contrib/Dockerfile) is a wheel install, where a missing subpackage
only shows when a Matrix account starts; the editable install the tests run
on never notices. The wheel is built from what the Dockerfile's COPY lines
copy, so the image's build context is checked too (no container engine here)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def docker_copies(dockerfile: Path) -> list[str]:
    """The sources of the Dockerfile's COPY lines (paths in the repository)."""
    copied = []
    for line in dockerfile.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].upper() == "COPY":
            copied += [w.rstrip("/") for w in words[1:-1] if not w.startswith("--")]
    return copied


def test_the_wheel_has_every_package_and_the_admin_pages_files(tmp_path: Path) -> None:
    # built from a copy of what the image copies (and no build/ directory,
    # which setuptools would reuse with what an earlier configuration packaged)
    source = tmp_path / "src"
    source.mkdir()
    copied = docker_copies(ROOT / "contrib" / "Dockerfile")
    assert {"pyproject.toml", "bridge", "adapters", "workers"} <= set(copied)
    for name in copied:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
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


def test_docker_compose_runs_the_image_with_arguments_and_checks_that_hold() -> None:
    """No container engine runs here, so what compose would find wrong later is
    checked now: each talkbridge service builds contrib/Dockerfile, its command
    parses as ``talkbridge`` arguments, its config is mounted and valid, the
    daemon's healthcheck asks its own listener for /readyz and the worker's
    reads the key the worker writes (workers/settings.py health_key)."""
    import yaml  # PyYAML, a dependency of matrix-synapse in the test extra

    from adapters import AdapterRegistry
    from bridge.cli import parser
    from bridge.config import load_config
    from bridge.options import protocol_specs
    from workers.settings import health_key

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["redis"]["command"][:3] == ["redis-server", "--appendonly", "yes"]
    argv = parser(AdapterRegistry())
    for name, kind in (("talkbridge", "run"), ("worker", "worker")):
        service = services[name]
        assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        args = argv.parse_args(service["command"])
        assert args.command == kind
        mounts = {target: (host, mode) for host, target, mode in (v.split(":") for v in service["volumes"])}
        config_dir = str(Path(args.config).parent)
        assert mounts[config_dir][1] == "ro"  # the config, mounted read-only
        config_file = ROOT / mounts[config_dir][0] / Path(args.config).name
        environ = {k: str(v) for k, v in service["environment"].items()}
        config = load_config(config_file, protocol_specs(AdapterRegistry()), environ=environ)
        assert config.section("redis")["URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    check = " ".join(services["talkbridge"]["healthcheck"]["test"])
    port = config.section("http")["BindAddress"].rsplit(":", 1)[1]
    assert f"http://127.0.0.1:{port}/readyz" in check
    assert any(p.endswith(f":{port}") for p in services["talkbridge"]["ports"])
    check = " ".join(services["worker"]["healthcheck"]["test"])
    assert repr(health_key(config.section("redis")["KeyPrefix"], "HOST").removesuffix("HOST")) in check
