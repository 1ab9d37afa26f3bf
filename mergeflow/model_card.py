"""The model card (README.md) of a merged model, as mergekit writes one and the Hugging Face Hub reads it: front
matter (base_model, tags, library_name), the method and its parameters, the inputs with their digests, the scores
where the run measured them, and the equivalent mergekit YAML where one exists. Deterministic: the same merge
gives the same card, byte for byte."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

import mergeflow
from mergeflow.mergekit_config import to_mergekit
from mergeflow.storage import sha256_file

CARD = "README.md"


def model_card(method: str, params: Mapping[str, Any], inputs: Sequence[Mapping[str, str]], *,
               library_name: str = "safetensors", scores: Mapping[str, Mapping[str, float]] | None = None,
               mergekit_yaml: str | None = None, version: str = "") -> str:
    """The card's text. `inputs`: {role, name, uri, sha256} (base first); `scores`: {split: {metric: value}}."""
    base = next((ref for ref in inputs if ref["role"] == "base"), None)
    front = {"base_model": base["uri"] if base else None, "tags": ["merge", "mergeflow"],
             "library_name": library_name}
    lines = ["---", yaml.safe_dump({k: v for k, v in front.items() if v is not None}, sort_keys=False).strip(), "---",
             "", f"# Merged with Mergeflow{f' {version}' if version else ''}", "",
             f"This model was merged with the **{method}** method from the base and "
             f"{sum(ref['role'] == 'expert' for ref in inputs)} experts below.", "", "## Parameters", "", "```json",
             json.dumps(dict(params), indent=2, sort_keys=True, default=str), "```", "", "## Inputs", "",
             "| role | name | uri | sha256 |", "|---|---|---|---|"]
    lines += [f"| {ref['role']} | {ref['name']} | {ref['uri']} | `{ref['sha256']}` |" for ref in inputs]
    if scores:
        lines += ["", "## Scores", "", "| split | metric | value |", "|---|---|---:|"]
        lines += [f"| {split} | {metric} | {value:.4g} |" for split, metrics in sorted(scores.items())
                  for metric, value in sorted(metrics.items())]
    lines += ["", "## mergekit", ""]
    if mergekit_yaml:
        lines += ["The same merge as a mergekit configuration (same arithmetic, up to fp32 rounding and random "
                  "masks):", "", "```yaml", mergekit_yaml.strip(), "```"]
    else:
        lines += [f"mergekit has no equivalent of Mergeflow's `{method}` with these parameters."]
    return "\n".join(lines) + "\n"


def card_text(method: str, params: Mapping[str, Any], inputs: Sequence[Mapping[str, str]], files: Collection[str],
              out_dtype: str | None = None, scores: Mapping[str, Mapping[str, float]] | None = None) -> str:
    """The card of a merge: `inputs` as recorded ({role, name, uri, sha256}), `files` the output's file names (a
    config.json makes it a transformers model), `scores` {split: {metric: value}}."""
    mergekit = to_mergekit(method, params, next(r["uri"] for r in inputs if r["role"] == "base"),
                           [r["uri"] for r in inputs if r["role"] == "expert"], out_dtype)
    return model_card(method, params, inputs, library_name="transformers" if "config.json" in files else "safetensors",
                      scores=scores, mergekit_yaml=mergekit, version=mergeflow.__version__)


def write_card(directory: Path, method: str, params: Mapping[str, Any], inputs: Sequence[Mapping[str, str]],
               files: Collection[str], out_dtype: str | None = None) -> str:
    """Write the merge's card (README.md) into `directory`; returns its sha256."""
    (directory / CARD).write_text(card_text(method, params, inputs, files, out_dtype))
    return sha256_file(directory / CARD)
