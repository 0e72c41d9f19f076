"""What `pip install .` gives: the wheel built from a clean copy of the source by the project's own build
backend, installed into a fresh venv, runs its console scripts; and the Dockerfile's image runs a node
(only where a docker engine answers; skipped with the reason otherwise)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytier.testbed.netns import Testbed, run_prefix
from pytier.testbed.nodes import BIN, wait_for

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 120


def run(argv: list[str | Path], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # The installed commands must find their own copy of pytier, whatever PYTHONPATH the test run has.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TIMEOUT_S, cwd=cwd,
                          env=env)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The bin folder of a fresh venv with pytier installed from its wheel.

    The wheel is built offline with the build backend already in .venv (no build isolation); the
    runtime dependencies, pinned in pyproject.toml, are those .venv already has, seen through a .pth
    file, so that nothing is downloaded. pytier itself comes only from the wheel."""
    tmp = tmp_path_factory.mktemp("pkg")
    source = tmp / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = run([BIN / "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "--disable-pip-version-check", "-q", "-w", tmp / "wheels", source])
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp / "wheels").glob("pytier-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(source / "src")) for p in (source / "src/pytier").rglob("*.py")}
    assert modules - names == set(), "modules missing from the wheel (a package without __init__.py?)"

    venv = tmp / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert made.returncode == 0, made.stderr
    [site] = (venv / "lib").glob("python3*/site-packages")
    (site / "pytier-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = run([BIN / "pip", "--python", venv / "bin/python", "install", "--no-deps", "--no-index",
                "--disable-pip-version-check", "-q", wheel])
    assert done.returncode == 0, done.stderr
    yield venv / "bin"


def test_console_scripts_of_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    where = run([installed / "python", "-c", "import pytier; print(pytier.__file__)"], cwd=tmp_path)
    assert where.stdout.startswith(str(installed.parent / "lib")), where.stdout  # not the source tree's
    version = run([installed / "pytier-core", "--version"], cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("pytier-core 0.1.0"), version.stderr
    for argv in (["pytier-core", "--help"], ["pytier-cli", "--help"], ["pytier-cli", "service", "--help"],
                 ["pytier-linkem", "--help"]):
        done = run([installed / argv[0], *argv[1:]], cwd=tmp_path)
        assert done.returncode == 0 and done.stdout.startswith("usage: "), (argv, done.stderr)
    check = run([installed / "pytier-core", "--check-config", "--metrics-listen", "9110"], cwd=tmp_path)
    assert check.returncode == 0 and 'metrics_listen = "127.0.0.1:9110"' in check.stdout
    example = run([installed / "pytier-core", "--check-config", "-c", REPO / "packaging/node.example.toml"])
    assert example.returncode == 0 and example.stderr == "", example.stderr


def test_the_installed_node_runs_and_answers_the_installed_cli(installed: Path, testbed: Testbed) -> None:
    ns = testbed.netns("pkg")
    argv = [installed / "pytier-core", "--no-tun", "--no-listener", "--hostname", "pkg-node",
            "--metrics-listen", "127.0.0.1:9110"]
    node = testbed.popen(ns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def answer() -> dict[str, object] | None:
        assert node.poll() is None, node.stderr.read() if node.stderr else ""
        done = ns.run([installed / "pytier-cli", "-o", "json", "node"], check=False)
        return json.loads(done.stdout) if done.returncode == 0 else None

    info = wait_for(answer, 15, "the installed pytier-core to answer")
    assert info["hostname"] == "pkg-node" and info["version"] == "pytier-0.1.0"
    metrics = ns.run([installed / "pytier-cli", "stats", "prometheus"]).stdout
    assert 'pytier_node_info{' in metrics and 'hostname="pkg-node"' in metrics
    node.send_signal(signal.SIGTERM)
    assert node.wait(15) == 0


def _docker_unavailable() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    try:
        info = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                              text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no reason given"])[-1]
        return f"no docker engine answers (docker info: {reason})"
    return None


def test_docker_image_runs_a_node() -> None:
    reason = _docker_unavailable()
    if reason is not None:
        pytest.skip(f"Dockerfile not built: {reason}")
    tag = f"pytier-test:{run_prefix()}"
    name = f"pytier-test-{run_prefix()}"
    built = subprocess.run(["docker", "build", "-q", "-t", tag, str(REPO)], capture_output=True, text=True,
                           timeout=900)
    assert built.returncode == 0, built.stderr
    try:
        # No network at all for the container: the node makes its TUN device and answers on loopback.
        started = run(["docker", "run", "-d", "--name", name, "--network", "none", "--cap-add", "NET_ADMIN",
                       "--device", "/dev/net/tun", tag, "--no-listener", "--ipv4", "10.144.144.1/24",
                       "--hostname", "in-docker"])
        assert started.returncode == 0, started.stderr

        def answer() -> dict[str, object] | None:
            done = run(["docker", "exec", name, "pytier-cli", "-o", "json", "node"])
            return json.loads(done.stdout) if done.returncode == 0 else None

        info = wait_for(answer, 60, "the node in the container to answer", interval=1.0)
        assert info["hostname"] == "in-docker" and info["dev_name"]
        stopped = run(["docker", "stop", "-t", "30", name])
        assert stopped.returncode == 0, stopped.stderr
        state = run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name]).stdout.strip()
        assert state == "0", run(["docker", "logs", name]).stderr
    finally:
        run(["docker", "rm", "-f", name])
        run(["docker", "rmi", "-f", tag])
