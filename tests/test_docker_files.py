"""No Docker engine runs here, so the image and compose files are checked statically: every file the
Dockerfile copies exists, the lock it installs is the repository's, and compose services are consistent."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_dockerfile_copies_existing_paths_and_installs_the_lock():
    text = (ROOT / "docker" / "Dockerfile").read_text()
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.MULTILINE)
    assert copied
    for sources in copied:
        for source in sources.split():
            assert (ROOT / source).exists(), f"Dockerfile copies {source}, which does not exist"
    assert "-r requirements.lock" in text
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
            assert volume.split(":")[0] in compose["volumes"]
    runner_config = services["runner"]["command"][-1]
    assert (ROOT / runner_config).is_file()
