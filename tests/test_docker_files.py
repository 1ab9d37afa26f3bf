"""No Docker engine runs here, so the image and compose files are checked statically: every file the
Dockerfile copies exists, the lock it installs is the repository's, and compose services are consistent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` the Dockerfile's RUN instructions run (comments are not read)."""
    joined = re.sub(r"\\\n", " ", text)
    commands = [part for run in re.findall(r"^RUN\s+(.+)$", joined, flags=re.MULTILINE) for part in run.split("&&")]
    return [command.split()[command.split().index("install") + 1:] for command in commands
            if re.search(r"\bpip\s+install\b", command)]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_existing_paths_and_install_the_lock(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.MULTILINE)
    assert copied
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
    assert any("requirements.lock" in sources.split() for sources in copied)
    # torch is installed at the lock's pinned version: named with exactly that pin, or from the lock itself
    locked = dict(re.findall(r"^(torch|torchvision)==(\S+)$", (ROOT / "requirements.lock").read_text(),
                             flags=re.MULTILINE))
    assert set(locked) == {"torch", "torchvision"}, "requirements.lock pins no torch / torchvision"
    installs = _pip_installs(text)
    named = [arg for install in installs for arg in install if re.match(r"torch(vision)?\b", arg)]
    if named:
        assert sorted(named) == [f"{name}=={version}" for name, version in sorted(locked.items())], named
    else:
        assert any(pair == ("-r", "requirements.lock") for install in installs for pair in zip(install, install[1:])), \
            f"{dockerfile} installs torch neither pinned nor from the lock"
    assert 'ENTRYPOINT ["mergeflow"]' in text


def test_compose_services_bind_loopback_and_reference_known_services():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"s3", "mlflow", "prefect", "runner"} <= set(services)
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
        for dependency in service.get("depends_on", []):
            assert dependency in services
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in compose["volumes"] or (ROOT / "docker" / source).is_file(), (name, volume)
    runner_config = services["runner"]["command"][-1]
    assert (ROOT / runner_config).is_file()


def test_compose_uses_postgres_and_a_gpu_worker_on_the_deployments_pool():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert "postgresql://" in " ".join(services["mlflow"]["command"])
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    worker = services["worker"]
    pool = worker["command"][worker["command"].index("--pool") + 1]
    deployments = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {pool}
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and worker["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    init = (ROOT / "docker" / "postgres-init.sql").read_text()
    assert "CREATE DATABASE mlflow" in init and services["mlflow"]["depends_on"][0] == "postgres"
