"""Environment fixes that must run before torchvision, transformers or open_clip are imported.

The only one today: the PyPI torchvision 0.28.0 wheel is a CUDA build whose `_C` extension cannot load beside
the CPU build of torch 2.13.0, and `import torchvision` then fails with
"operator torchvision::nms does not exist". transformers imports torchvision whenever it is installed, and
open_clip imports it at module load, so every model load would fail. When (and only when) the extension does
not load, we declare torchvision's operator schemas ourselves; transforms, models and open_clip then work and
only the detection kernels (nms, roi_*, deform_conv2d) stay unavailable.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

# Schemas as declared in torchvision's C++ sources (torchvision/csrc/ops/*.cpp).
_TORCHVISION_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, float rois_scale, "
    "int rois_zero_point, float spatial_scale, SymInt pooled_height, SymInt pooled_width, int sampling_ratio, "
    "bool aligned) -> Tensor",
    "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio, bool aligned) -> Tensor",
    "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, int sampling_ratio, "
    "bool aligned) -> Tensor",
    "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, SymInt pooled_height, "
    "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width) -> Tensor",
    "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width, "
    "int sampling_ratio) -> (Tensor, Tensor)",
    "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, SymInt channels, "
    "SymInt height, SymInt width) -> Tensor",
    "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, SymInt pooled_width) "
    "-> (Tensor, Tensor)",
    "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
    "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, "
    "SymInt width) -> Tensor",
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, SymInt stride_h, "
    "SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, SymInt dilation_w, SymInt groups, "
    "SymInt offset_groups, bool use_mask) -> Tensor",
    "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, Tensor mask, "
    "Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
    "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> (Tensor, Tensor, Tensor, "
    "Tensor, Tensor)",
)

_library: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas
torchvision_ops_stubbed = False


def _torchvision_extension() -> Path | None:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    found = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    return found[0] if found else None


def ensure_torchvision_importable() -> bool:
    """Make `import torchvision` work; returns True when the operator schemas had to be declared here."""
    global _library, torchvision_ops_stubbed
    if torchvision_ops_stubbed or "torchvision" in sys.modules:
        return torchvision_ops_stubbed
    extension = _torchvision_extension()
    if extension is None:
        return False  # torchvision not installed: nothing to fix
    try:
        torch.ops.load_library(str(extension))
        return False  # the real extension works (a matching torch build): leave it alone
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS:
        _library.define(schema)
    torchvision_ops_stubbed = True
    return True


def skip_weight_init() -> contextlib.AbstractContextManager[Any]:
    """A context in which a transformers model built from its config leaves its weights uninitialised (about 0.25 s
    less per MiniLM built), for a caller that then loads every weight strictly; a no-op where transformers has no
    such switch."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()
