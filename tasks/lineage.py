"""Read lineage back out of MLflow: which checkpoints, data and settings built a registered merged model
(`mergeflow lineage`), and download a registered model with its digests verified (`mergeflow pull`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from mergeflow.errors import ConfigError, IntegrityError
from mergeflow.storage import sha256_file


def _client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def resolve_version(client, spec: str):
    """MODEL@alias, MODEL/version, or MODEL (its newest version)."""
    from mlflow.exceptions import MlflowException

    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            return client.get_model_version_by_alias(name, alias)
        if "/" in spec:
            name, version = spec.rsplit("/", 1)
            return client.get_model_version(name, version)
        versions = client.search_model_versions(f"name = '{spec}'")
        if not versions:
            raise ConfigError(f"registered model {spec!r} has no versions")
        return max(versions, key=lambda v: int(v.version))
    except MlflowException as exc:
        raise ConfigError(f"cannot resolve {spec!r} in the model registry: {exc.message}") from None


def model_id_of(version) -> str | None:
    """The logged model behind a registry version (older servers drop `model_id`; Mergeflow also tags it)."""
    return getattr(version, "model_id", None) or version.tags.get("mergeflow.model_id")


def _inputs(run) -> list[dict[str, str]]:
    found = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        source = json.loads(item.dataset.source)
        context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
        found.append({"context": context, "name": item.dataset.name, **source})
    return found


def lineage(tracking_uri: str, spec: str) -> dict[str, Any]:
    """The tree model -> run -> inputs (URIs, digests) -> expert training runs, as a dict."""
    client = _client(tracking_uri)
    version = resolve_version(client, spec)
    registered = client.get_registered_model(version.name).aliases
    aliases = sorted(a for a, v in registered.items() if str(v) == str(version.version))
    model_id = model_id_of(version)
    model = client.get_logged_model(model_id) if model_id else None
    run = client.get_run(version.run_id)
    tree: dict[str, Any] = {
        "model": f"{version.name} v{version.version}", "aliases": aliases, "model_id": model_id,
        "uri": model.tags.get("mergeflow.uri") if model else None,
        "sha256": model.tags.get("mergeflow.sha256") if model else None,
        "gate": {k.removeprefix("gate."): v for k, v in version.tags.items() if k.startswith("gate.")},
        "run": {"id": run.info.run_id, "name": run.info.run_name, "params": run.data.params,
                "parent": run.data.tags.get("mlflow.parentRunId")},
        "inputs": [],
    }
    if tree["run"]["parent"]:
        parent = client.get_run(tree["run"]["parent"])
        tree["run"]["prefect_flow_run_id"] = parent.data.tags.get("prefect.flow_run_id")
    for item in _inputs(run):
        if item["context"] == "expert":
            trained = client.search_runs([run.info.experiment_id],
                                         f"params.expert_sha256 = '{item['sha256']}'", max_results=1,
                                         order_by=["attributes.start_time DESC"])
            if trained:
                t = trained[0]
                item["training_run"] = {"id": t.info.run_id, "name": t.info.run_name,
                                        "inputs": _inputs(t), "reused": t.data.tags.get("mergeflow.reused"),
                                        "steps": t.data.params.get("finetune.steps")}
        tree["inputs"].append(item)
    return tree


def format_lineage(tree: dict[str, Any]) -> str:
    lines = [f"{tree['model']}  aliases: {', '.join(tree['aliases']) or '-'}",
             f"  model {tree['model_id']}  {tree['uri']}  sha256:{tree['sha256']}"]
    if tree["gate"]:
        g = tree["gate"]
        lines.append(f"  gate: {g.get('metric')} {g.get('candidate_score')} vs champion {g.get('champion_score')}"
                     f" (margin {g.get('margin')}): {'promoted' if g.get('promoted') == 'True' else 'not promoted'}")
    run = tree["run"]
    lines.append(f"  run {run['name']} {run['id']}  method {run['params'].get('method')}"
                 + (f"  (flow run {run.get('prefect_flow_run_id')})" if run.get("prefect_flow_run_id") else ""))
    for item in tree["inputs"]:
        lines.append(f"    {item['context']:10s} {item['name']}  {item['uri']}  sha256:{item['sha256']}")
        training = item.get("training_run")
        if training:
            lines.append(f"      trained by run {training['name']} {training['id']}  steps {training['steps']}")
            for source in training["inputs"]:
                lines.append(f"        {source['context']:8s} {source['uri']}  sha256:{source['sha256']}")
    return "\n".join(lines)


MANIFEST_TAG = "mergeflow.manifest_sha256"  # logged-model tag: sha256 of the model's mergeflow.json


def _verified_manifest(spec: str, files: Path, recorded: str | None) -> dict[str, Any]:
    """The downloaded model's manifest, after checking it against the digest MLflow recorded when the model was
    logged, and that the download holds no file the manifest does not list."""
    manifest_path = files / "mergeflow.json"
    if not manifest_path.is_file():
        raise IntegrityError(f"{spec}: the model has no mergeflow.json manifest")
    if not recorded:
        raise IntegrityError(f"{spec}: MLflow records no manifest digest ({MANIFEST_TAG}) for this model, so its "
                             "files cannot be verified; merge it again with this version of mergeflow")
    got = sha256_file(manifest_path)
    if got != recorded:
        raise IntegrityError(f"{spec}: mergeflow.json has sha256 {got}, MLflow recorded {recorded} when the model "
                             "was logged")
    manifest = json.loads(manifest_path.read_text())
    listed = set(manifest["files"]) | {"mergeflow.json"}
    unlisted = sorted(str(path.relative_to(files)) for path in files.rglob("*")
                      if path.is_file() and str(path.relative_to(files)) not in listed)
    if unlisted:
        raise IntegrityError(f"{spec}: the model's artifacts hold files its manifest does not list: "
                             f"{', '.join(unlisted)}")
    return manifest


def pull(tracking_uri: str, spec: str, destination: Path) -> Path:
    """Download a registered model's files into `destination` and verify every digest (the manifest's against
    MLflow's record, each listed file's against the manifest; a file it does not list is refused); all or
    nothing."""
    import mlflow.artifacts

    from mergeflow.checkpoints import open_checkpoint
    from mergeflow.content_cache import ContentCache

    client = _client(tracking_uri)
    version = resolve_version(client, spec)
    model = client.get_logged_model(model_id_of(version))
    destination = Path(destination)
    if destination.exists():
        raise FileExistsError(f"{destination} already exists")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        files = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location,
                                                         dst_path=str(staged / "download"),
                                                         tracking_uri=tracking_uri))
        manifest = _verified_manifest(spec, files, model.tags.get(MANIFEST_TAG))
        for name, digest in manifest["files"].items():
            got = sha256_file(files / name)
            if got != digest:
                raise IntegrityError(f"{spec}: {name} has sha256 {got}, the model's manifest records {digest}")
        with open_checkpoint(str(files), cache=ContentCache(staged / "cache")) as ckpt:
            if ckpt.digest != model.tags.get("mergeflow.sha256"):
                raise IntegrityError(f"{spec}: checkpoint digest {ckpt.digest} != registered "
                                     f"{model.tags.get('mergeflow.sha256')}")
        files.rename(destination)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return destination
