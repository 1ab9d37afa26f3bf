"""Squared per-example gradients of a whole batch from one backward pass, by module hooks (the diagonal Fisher of
`mergeflow.statistics` without a forward and backward per example).

For each example e of a batch, with a the module's input and g the gradient of the summed loss w.r.t. its output
(g of example e depends on example e alone, the loss being a sum over examples):
- `nn.Linear`:    dW_e = sum_t g[e, t]^T a[e, t] (one batched matmul), db_e = sum_t g[e, t];
- `nn.Embedding`: row v of dW_e = sum over the positions t of e whose id is v of g[e, t] (ids equal to
                  `padding_idx` get no gradient, as in torch);
- `nn.LayerNorm`: dw_e = sum_t g[e, t] * x_hat[e, t], db_e = sum_t g[e, t].
An output computed once for the whole batch (leading dimension 1, e.g. position embeddings added by
broadcasting) is expanded to the batch in the forward hook, so its gradient arrives per example.

`supported(model)` says whether every trainable parameter sits on one of those modules (else the caller runs one
example at a time); a module called more than once in a forward, or whose input does not lead with the batch,
raises `Unsupported` at that batch, as does an embedding with `max_norm`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)
_CHUNK_BYTES = 64 * 2**20  # cap on one [examples, out, in] block of per-example weight gradients


class Unsupported(RuntimeError):
    """The model does something the hooks cannot split per example; run one example at a time instead."""


def supported(model: nn.Module) -> bool:
    """Whether every trainable parameter of `model` belongs directly to a Linear, Embedding or LayerNorm."""
    owners: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, SUPPORTED):
            if isinstance(module, nn.Embedding) and module.max_norm is not None:
                return False
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
    # a parameter shared by two modules (tied embeddings) gets the sum of both uses: not split here
    return all(owners.get(id(p)) == 1 for p in model.parameters() if p.requires_grad)


class SquaredGradients:
    """Hooks adding sum_e (dtheta_e)^2 of every trainable parameter into `squares` (name -> fp32 tensor).

    Call `next_batch(size)` before each forward."""

    def __init__(self, model: nn.Module, squares: dict[str, Tensor]):
        self.squares = squares
        self.batch_size = 0
        self.calls: dict[str, int] = {}
        self.outputs: list[Tensor] = []  # this batch's hooked outputs: backward(inputs=...) skips parameter grads
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, SUPPORTED) and any(p.requires_grad for p in module.parameters(recurse=False)):
                self.handles.append(module.register_forward_hook(self._hook(name, module)))

    def _key(self, module_name: str, param: str) -> str:
        return f"{module_name}.{param}" if module_name else param

    def _hook(self, name: str, module: nn.Module) -> Callable[..., Tensor | None]:
        def hook(mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
            self.calls[name] = self.calls.get(name, 0) + 1
            if self.calls[name] > 1:
                raise Unsupported(f"module {name!r} runs more than once per forward")
            batch = self.batch_size
            x = inputs[0]
            replaced = None
            if x.shape[0] != batch:
                if x.shape[0] != 1 or output.shape[0] != 1:
                    raise Unsupported(f"module {name!r}: input does not lead with the batch ({tuple(x.shape)})")
                x = x.expand(batch, *x.shape[1:])
                output = replaced = output.expand(batch, *output.shape[1:])
            if output.requires_grad:
                x = x.detach()
                output.register_hook(lambda grad: self._accumulate(name, module, x, grad))
                self.outputs.append(output)
            return replaced
        return hook

    def _add(self, module_name: str, param: str, value: Tensor) -> None:
        key = self._key(module_name, param)
        if key in self.squares:
            self.squares[key].add_(value)

    def _accumulate(self, name: str, module: nn.Module, x: Tensor, grad: Tensor) -> None:
        batch = self.batch_size
        g = grad.detach().float().reshape(batch, -1, grad.shape[-1])  # [B, T, out]
        if isinstance(module, nn.Linear):
            a = x.float().reshape(batch, -1, x.shape[-1])  # [B, T, in]
            if module.weight.requires_grad:
                self._add(name, "weight", _linear_squares(g, a))
            if module.bias is not None and module.bias.requires_grad:
                self._add(name, "bias", g.sum(dim=1).square().sum(dim=0))
        elif isinstance(module, nn.Embedding):
            if module.weight.requires_grad:
                self._embedding_squares(name, module, x.reshape(batch, -1), g)
        else:  # LayerNorm
            x_hat = F.layer_norm(x.float(), module.normalized_shape, eps=module.eps)
            g = grad.detach().float().reshape(batch, -1, *module.normalized_shape)
            x_hat = x_hat.reshape(batch, -1, *module.normalized_shape)
            if module.weight is not None and module.weight.requires_grad:
                self._add(name, "weight", (g * x_hat).sum(dim=1).square().sum(dim=0))
            if module.bias is not None and module.bias.requires_grad:
                self._add(name, "bias", g.sum(dim=1).square().sum(dim=0))

    def _embedding_squares(self, name: str, module: nn.Embedding, ids: Tensor, g: Tensor) -> None:
        rows = module.num_embeddings
        example = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(ids)
        keep = ids != module.padding_idx if module.padding_idx is not None else torch.ones_like(ids, dtype=torch.bool)
        keys = (example * rows + ids)[keep]
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = g.new_zeros(len(unique), g.shape[-1]).index_add_(0, inverse, g[keep])
        key = self._key(name, "weight")
        if key in self.squares:
            self.squares[key].index_add_(0, unique % rows, sums.square())

    def next_batch(self, batch_size: int) -> None:
        """Before each forward: the batch's size (module inputs must lead with it)."""
        self.batch_size = batch_size
        self.calls.clear()
        self.outputs.clear()

    def backward(self, loss: Tensor) -> None:
        """Backpropagate `loss` to the hooked outputs only (the hooks take every parameter's share from there)."""
        loss.backward(inputs=self.outputs)
        for output in self.outputs:
            output.grad = None
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _linear_squares(g: Tensor, a: Tensor) -> Tensor:
    """sum_e (g_e^T a_e)^2 for g [B, T, out], a [B, T, in], in chunks of examples."""
    batch, _, out = g.shape
    step = max(1, _CHUNK_BYTES // (4 * out * a.shape[-1]))
    total = g.new_zeros(out, a.shape[-1])
    for start in range(0, batch, step):
        per_example = torch.bmm(g[start:start + step].mT, a[start:start + step])
        total.add_(per_example.square_().sum(dim=0))
    return total
