"""No Docker engine runs here, so the image and compose files are checked statically: every file the
Dockerfile copies exists, the lock it installs is the repository's, and compose services are consistent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_existing_paths_and_install_the_lock(dockerfile):
    text = (ROOT / "docker" / dockerfile).read_text()
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.MULTILINE)
    assert copied
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), f"{dockerfile} copies {source}, which does not exist"
    assert "requirements.lock" in text and "torch==2.13.0" in text or "-r requirements.lock" in text
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
