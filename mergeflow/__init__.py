"""Mergeflow: merge fine-tuned expert models into one multi-task model.

The library is pure Python and torch; orchestration (Prefect) and tracking (MLflow) live in `tasks/` and `flows/`.
"""

from mergeflow.compat import ensure_torchvision_importable

__version__ = "0.1.0"

ensure_torchvision_importable()  # before anything can import torchvision, transformers or open_clip
