"""The statistics stage of data-aware merging: per-expert curvature statistics from a small sample of task data.

For one model and its task's batches, forward and backward hooks on every selected `nn.Linear` record
  `<weight>::gram_in`   A = E[a a^T] over the layer's input rows a (tokens), [in, in];
  `<weight>::gram_out`  G = E[g g^T] over the gradients g of the log-likelihood w.r.t. the layer's output rows,
                        [out, out] (the K-FAC factors of MaTS);
and so do the modules of the `in_out` types a family names: linear layers whose weight is stored [in, out]
(y = x W + b, GPT-2's `Conv1D`), listed in the file's `in_out` metadata (`in_out_weights`) so that a method applies
their Grams from the other side (a Gram's shape alone cannot tell a square weight's layout);
and the gradients give `<param>::fisher`, the diagonal Fisher E[(d log p(y|x) / d theta)^2] of every trainable
parameter, accumulated per example (batch size 1 semantics, as MaTS and Fisher merging define it).
Grams are normalised by the number of rows that reached the layer; where a batch has an attention mask and a
layer's input has the mask's leading [batch, tokens] shape, padding tokens are left out of sum and count.
The label y is the data label (empirical Fisher, the default) or, with `fisher="sampled"`, drawn from the
model's predictive distribution with a seeded generator (one draw per example, in order).

Names are the model's own parameter names, so pass the module whose state dict matches the checkpoint. The
result is written as one safetensors file (`save_statistics`) and read lazily, one tensor at a time, like a
checkpoint (`open_statistics`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from mergeflow.progress import progress_bar

from mergeflow.checkpoints.safetensors_format import save_safetensors
from mergeflow.checkpoints import Checkpoint, StateDictSource, TensorInfo, TensorSource, open_checkpoint
from mergeflow import per_example
from mergeflow.errors import CheckpointError, ConfigError
from mergeflow.selection import ParameterSelection
from mergeflow.storage import sha256_file
from mergeflow.content_cache import ContentCache

GRAM_IN = "gram_in"
GRAM_OUT = "gram_out"
FISHER = "fisher"
KINDS = (GRAM_IN, GRAM_OUT, FISHER)
SEPARATOR = "::"
FORMAT = "mergeflow-statistics"
IN_OUT = "in_out"  # metadata: JSON list of the weights with Grams stored [in, out] (absent: none)
PROBE = 4  # examples of the first batch whose Fisher by hooks is checked against one backward per example

Batch = Mapping[str, Tensor]
FisherLabels = Literal["empirical", "sampled"]


def statistic_key(param: str, kind: str) -> str:
    return f"{param}{SEPARATOR}{kind}"


def split_statistic_key(key: str) -> tuple[str, str]:
    """(parameter name, kind) of a statistic key; ValueError when it is not one."""
    param, sep, kind = key.rpartition(SEPARATOR)
    if not sep or not param or kind not in KINDS:
        raise ValueError(f"{key!r} is not a statistic key (<parameter>{SEPARATOR}<{'|'.join(KINDS)}>)")
    return param, kind


@dataclass
class Statistics:
    tensors: dict[str, Tensor]  # statistic key -> fp32 CPU tensor
    metadata: dict[str, str]  # format, kinds, fisher, examples, max_examples, seed, model_digest


def model_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _rows(x: Tensor, mask: Tensor | None) -> Tensor:
    """[rows, features] of a layer input or output gradient, without the padding tokens of `mask`."""
    if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()].reshape(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1])


class _GramHooks:
    """Forward hooks summing a^T a per selected linear layer, and (when the output needs a gradient) a tensor hook
    on its output summing g^T g at backward time."""

    def __init__(self, layers: Mapping[str, nn.Module], want_out: bool):
        self.sums: dict[str, dict[str, Tensor]] = {GRAM_IN: {}, GRAM_OUT: {}}
        self.counts: dict[str, dict[str, int]] = {GRAM_IN: {}, GRAM_OUT: {}}
        self.mask: Tensor | None = None
        self.want_out = want_out
        self.enabled = True
        self.handles = [module.register_forward_hook(self._forward(name)) for name, module in layers.items()]

    def _add(self, kind: str, name: str, rows: Tensor) -> None:
        rows = rows.detach().float()
        sums = self.sums[kind]
        if name in sums:
            sums[name].addmm_(rows.T, rows)
        else:
            sums[name] = rows.T @ rows
        self.counts[kind][name] = self.counts[kind].get(name, 0) + rows.shape[0]

    def _forward(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if not self.enabled:
                return
            mask = self.mask
            self._add(GRAM_IN, name, _rows(inputs[0], mask))
            if self.want_out and output.requires_grad:
                output.register_hook(lambda grad: self._add(GRAM_OUT, name, _rows(grad, mask)))
        return hook

    def results(self) -> dict[str, Tensor]:
        return {statistic_key(name, kind): total / self.counts[kind][name]
                for kind, sums in self.sums.items() for name, total in sums.items()}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _batch_size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def _examples(batches: Iterable[Batch], limit: int, per_example: bool) -> Iterator[Batch]:
    """The batches cut to `limit` examples in all, split into single examples when `per_example`."""
    seen = 0
    for batch in batches:
        take = min(_batch_size(batch), limit - seen)
        if take <= 0:
            return
        if per_example:
            yield from ({k: v[i:i + 1] for k, v in batch.items()} for i in range(take))
        else:
            yield {k: v[:take] for k, v in batch.items()}
        seen += take


def linear_layers(model: nn.Module, selection: ParameterSelection | None = None,
                  in_out: tuple[type[nn.Module], ...] = ()) -> dict[str, nn.Module]:
    """Weight name -> module for every `nn.Linear` of `model` and every module of an `in_out` type (those whose
    weight `selection` selects, if given)."""
    layers = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, *in_out)):
            continue
        weight = f"{name}.weight" if name else "weight"
        if selection is None or selection.selects(TensorInfo(weight, tuple(module.weight.shape),
                                                             module.weight.dtype)):
            layers[weight] = module
    return layers


def collect_statistics(model: nn.Module, batches: Iterable[Batch], logits_fn: Callable[[Batch], Tensor], *,
                       kinds: Sequence[str] = KINDS, fisher: FisherLabels = "empirical",
                       max_examples: int = 1000, seed: int = 0, selection: ParameterSelection | None = None,
                       labels_key: str = "labels", mask_key: str = "attention_mask",
                       in_out: tuple[type[nn.Module], ...] = (), progress: bool = False) -> Statistics:
    """Statistics of `model` on up to `max_examples` examples of `batches` (the model runs in eval mode).

    `logits_fn(batch)` runs the model (and whatever head sits on it) and returns [B, C] logits; the loss is the
    negative log-likelihood of `batch[labels_key]` (or of sampled labels). Every batch value is a tensor with the
    batch as its first dimension. Whole batches run at once (per-example output gradients are exact, the loss being
    a sum over examples); the Fisher needs per-example parameter gradients, which hooks take from the batch's
    backward pass where every trainable parameter sits on a Linear, Embedding or LayerNorm
    (`mergeflow.per_example`). The first `PROBE` examples are also run one example at a time and the two Fishers
    compared;
    a model the hooks cannot split (or a mismatch) runs one example at a time throughout.
    Parameters that never receive a gradient get a zero Fisher; layers no gradient reaches get no `gram_out`.
    Modules of the `in_out` types get Grams too, as linear layers with weights stored [in, out] (`IN_OUT`).
    """
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {list(kinds)}")
    if max_examples < 1:
        raise ValueError(f"max_examples must be at least 1, got {max_examples}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    run = _Run(model, params, logits_fn, kinds, fisher, seed, labels_key, mask_key, selection, in_out)
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(progress_bar(_examples(batches, max_examples, False), desc="statistics",
                                                   disable=not progress)):
            if index == 0 and FISHER in kinds:
                run.first_batch(batch)
            else:
                run.batch(batch)
    finally:
        run.close()
        model.train(was_training)
    if run.examples == 0:
        raise ValueError("no examples to compute statistics on")
    tensors = {key: value for key, value in run.grams.results().items() if split_statistic_key(key)[1] in kinds}
    tensors.update({statistic_key(name, FISHER): total / run.examples for name, total in run.squares.items()})
    metadata = {"format": FORMAT, "kinds": ",".join(k for k in KINDS if k in kinds), "fisher": fisher,
                "examples": str(run.examples), "max_examples": str(max_examples), "seed": str(seed),
                "model_digest": model_digest(model)}
    transposed = sorted({split_statistic_key(key)[0] for key in tensors} & run.in_out)
    if transposed:  # only then: the files of models without such layers are those of before
        metadata[IN_OUT] = json.dumps(transposed)
    return Statistics({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}, metadata)


def fishers_agree(got: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> bool:
    """Whether two Fisher sums agree up to rounding: 1e-3 relative, and entries at rounding-noise level (e.g.
    attention key biases, whose true gradient is 0) within 1e-6 of the model's largest entry."""
    scale = max((float(v.abs().max()) for v in reference.values() if v.numel()), default=0.0)
    return all(torch.allclose(got[k], v, rtol=1e-3, atol=1e-6 * scale + 1e-30) for k, v in reference.items())


class _Run:
    """One statistics pass: Gram hooks, Fisher accumulators and how the Fisher is taken (hooks or per example)."""

    def __init__(self, model: nn.Module, params: dict[str, Tensor], logits_fn: Callable[[Batch], Tensor],
                 kinds: Sequence[str], fisher: FisherLabels, seed: int, labels_key: str, mask_key: str,
                 selection: ParameterSelection | None, in_out: tuple[type[nn.Module], ...] = ()):
        self.model, self.params, self.logits_fn = model, params, logits_fn
        self.fisher, self.labels_key, self.mask_key = fisher, labels_key, mask_key
        self.backward = GRAM_OUT in kinds or FISHER in kinds
        self.squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()} \
            if FISHER in kinds else {}
        self.generator = torch.Generator().manual_seed(seed)
        layers = linear_layers(model, selection, in_out) if GRAM_IN in kinds or GRAM_OUT in kinds else {}
        self.in_out = {name for name, module in layers.items() if not isinstance(module, nn.Linear)}
        self.grams = _GramHooks(layers, want_out=GRAM_OUT in kinds)
        self.hooked: per_example.SquaredGradients | None = None  # the Fisher from hooks, once the first batch agrees
        self.examples = 0

    def _loss(self, batch: Batch, generator: torch.Generator) -> Tensor | None:
        """Forward (Grams by hook); the summed NLL to differentiate, or None when nothing needs a backward."""
        self.grams.mask = batch.get(self.mask_key)
        with torch.set_grad_enabled(self.backward):
            logits = self.logits_fn(batch)
        self.examples += logits.shape[0]
        if not self.backward:
            return None
        if self.fisher == "sampled":  # one draw per example, in order, whatever the batching
            probs = torch.softmax(logits.detach().float(), dim=-1).cpu()
            labels = torch.cat([torch.multinomial(row[None], 1, generator=generator)[:, 0] for row in probs])
            labels = labels.to(logits.device)
        else:
            labels = batch[self.labels_key].to(logits.device)
        for p in self.params.values():
            p.grad = None
        return F.cross_entropy(logits.float(), labels, reduction="sum")

    def batch(self, batch: Batch) -> None:
        if self.squares and self.hooked is None:  # the Fisher one example at a time, from .grad
            for one in _examples([batch], _batch_size(batch), True):
                self._loss(one, self.generator).backward()
                for name, total in self.squares.items():
                    grad = self.params[name].grad
                    if grad is not None:
                        total.addcmul_(grad.detach().float(), grad.detach().float())
            return
        if self.hooked is not None:
            self.hooked.next_batch(_batch_size(batch))
        loss = self._loss(batch, self.generator)
        if loss is not None:
            self.hooked.backward(loss) if self.hooked is not None else loss.backward()

    def first_batch(self, batch: Batch) -> None:
        """The Fisher of the first batch's first `PROBE` examples by hooks (Grams off, labels from a copy of the
        generator), then one example at a time as the reference; the rest of the batch and later batches use the
        hooks when both agree."""
        probe = {k: v[:PROBE] for k, v in batch.items()}
        trial = self._hooked_trial(probe)
        self.batch(probe)
        if trial is not None and fishers_agree(trial, self.squares):
            self.hooked = per_example.SquaredGradients(self.model, self.squares)
        if _batch_size(batch) > PROBE:
            self.batch({k: v[PROBE:] for k, v in batch.items()})

    def _hooked_trial(self, batch: Batch) -> dict[str, Tensor] | None:
        if not per_example.supported(self.model):
            return None
        squares = {name: torch.zeros_like(total) for name, total in self.squares.items()}
        hooks = per_example.SquaredGradients(self.model, squares)
        generator = torch.Generator().set_state(self.generator.get_state())
        examples, self.grams.enabled = self.examples, False
        try:
            hooks.next_batch(_batch_size(batch))
            hooks.backward(self._loss(batch, generator))
            return squares
        except per_example.Unsupported:
            return None
        finally:
            hooks.remove()
            self.examples, self.grams.enabled = examples, True

    def close(self) -> None:
        self.grams.remove()
        if self.hooked is not None:
            self.hooked.remove()
        for p in self.params.values():
            p.grad = None


def save_statistics(stats: Statistics, path: str | Path) -> str:
    """Write `stats` as one safetensors file at local `path` (atomically); returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    save_safetensors(stats.tensors, partial, stats.metadata)
    os.replace(partial, path)
    return sha256_file(path)


def open_statistics(uri: str, *, storage_options: Mapping[str, Any] | None = None,
                    cache: ContentCache | None = None) -> Checkpoint:
    """Open a statistics file lazily (any checkpoint layout); every key must be `<parameter>::<kind>`."""
    stats = open_checkpoint(uri, storage_options=storage_options, cache=cache)
    for key in stats.keys():
        try:
            split_statistic_key(key)
        except ValueError as exc:
            stats.close()
            raise CheckpointError(uri, f"not a statistics file: {exc}") from None
    return stats


def statistics_source(statistics: Mapping[str, Tensor] | Statistics, label: str) -> StateDictSource:
    """In-memory statistics as a source: tensors, or a `Statistics` with its metadata (`IN_OUT`)."""
    if isinstance(statistics, Statistics):
        return StateDictSource(statistics.tensors, label, statistics.metadata)
    return StateDictSource(statistics, label)


def in_out_weights(statistics: Sequence[TensorSource]) -> frozenset[str]:
    """The weights the statistics list as stored [in, out] (`IN_OUT` metadata), the same for every expert."""
    listed = [_listed_in_out(source) for source in statistics]
    for source, names in zip(statistics[1:], listed[1:]):
        if names != listed[0]:
            raise ConfigError(f"statistics {source.label} and {statistics[0].label} disagree on the weights stored "
                              f"[in, out] ('{IN_OUT}' metadata), e.g. {sorted(names ^ listed[0])[0]!r}")
    return listed[0] if listed else frozenset()


def _listed_in_out(source: TensorSource) -> frozenset[str]:
    try:
        names = json.loads((getattr(source, "metadata", None) or {}).get(IN_OUT, "[]"))
    except ValueError:
        names = None
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise CheckpointError(source.label, f"'{IN_OUT}' metadata: expected a JSON list of weight names")
    return frozenset(names)


def validate_statistics(base: TensorSource, statistics: Sequence[TensorSource], experts: int) -> None:
    """One statistics source per expert, each statistic naming a parameter of `base` with the shape its kind
    implies: a Fisher the parameter's shape, a `gram_in` [in, in] and a `gram_out` [out, out] for an [out, in]
    weight (or an [in, out] one the source lists in `IN_OUT`). Which statistics a method needs is the method's
    check."""
    if len(statistics) != experts:
        raise ConfigError(f"{len(statistics)} statistics files for {experts} experts: give exactly one per expert, "
                          "in the experts' order")
    base_keys = set(base.keys())
    for stats in statistics:
        _validate_source(base, base_keys, stats)


def _validate_source(base: TensorSource, base_keys: set[str], stats: TensorSource) -> None:
    in_out = in_out_weights([stats])
    for key in stats.keys():
        try:
            param, kind = split_statistic_key(key)
        except ValueError as exc:
            raise CheckpointError(stats.label, str(exc)) from None
        if param not in base_keys:
            raise CheckpointError(stats.label, f"statistic of {param!r}, which the base checkpoint does not have",
                                  tensor=key)
        shape = base.info(param).shape
        if kind == FISHER:
            expected = shape
        elif len(shape) != 2:
            raise CheckpointError(stats.label, f"a {kind} needs a 2-D weight, but {param!r} has shape {shape}",
                                  tensor=key)
        else:
            inputs, outputs = (shape[0], shape[1]) if param in in_out else (shape[1], shape[0])
            expected = (inputs, inputs) if kind == GRAM_IN else (outputs, outputs)
        got = stats.info(key).shape
        if tuple(got) != tuple(expected):
            raise CheckpointError(stats.label, f"shape {tuple(got)} does not fit {param!r} {shape} "
                                               f"(expected {tuple(expected)})", tensor=key)
