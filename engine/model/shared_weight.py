"""Linear products whose weight many passes share, with the weight's gradient taken once for all of them.

In the latent block each layer's weights serve every pass: M one-position passes of B rows, then the final chunk.
Autograd differentiates each use on its own: a product per use that writes a whole weight-sized gradient (at B =
64 rows a few microseconds of work for a 17 MB write at the 1B geometry's gate/up weight), then an add per use to
sum them: ~10 kernels and ~0.6 GB of memory traffic per layer for six uses. `SharedWeight` keeps each small use's
input and output gradient instead, and takes the weight's gradient as one product over all of them once every
use's backward has run: its own autograd node (`_Gather`) lies downstream of every use, so the engine runs it
last. A use of many rows (the final chunk) does real work in its product: where its input and output gradient
together outweigh the weight's gradient, it adds its product into that gradient at once, in place, rather than
holding its output gradient (tens of MB a layer) to the end (`kept_to_the_end`). Where they do not, it is kept too:
summed at once, a wide weight's gradient would live from the first backward to the last use's, every layer's at
the same time since the final chunk is differentiated first (at the 8B geometry, batch 8, a 512-row final chunk held
12 GiB of gradients that way, in the CUDA graphs' memory pool).

The gradient is the same sum (in one fp32-accumulated product where autograd rounds each use's product to the
weight's dtype and then each partial sum). Nothing else changes: each use's forward is torch's linear and its input
gradient the same product as autograd's.

The uses save the weight they were given (a parameter, or the merged copy), not the alias `_Gather` makes of it, as
DeepSpeed's ZeRO-3 linear saves its parameter: a saved parameter is the parameter itself, so under ZeRO-3, which
releases its gathered storage after the forward and gathers it anew before the backward, the backward reads the new
storage, where a saved alias (a view) would keep the whole gathered weight alive in between.
"""

from __future__ import annotations

import torch

_TORCH_LINEAR = torch._C._nn.linear  # whatever `torch.nn.functional.linear` is replaced by
STASH_ROWS = 256  # uses of at most this many rows keep (input, output gradient) for the one product at the end


def kept_to_the_end(rows: int, in_features: int, out_features: int) -> bool:
    """Whether a use of `rows` rows keeps its input and output gradient for the one product at the end (else it adds
    its own product to the gradient at once): a few rows, or fewer elements than the gradient they stand for."""
    return rows <= STASH_ROWS or rows * (in_features + out_features) <= in_features * out_features


class _Uses:
    """What the uses of one shared weight leave for its gradient: the kept (input, output gradient) pairs of the
    small uses, tagged with the backward (autograd graph task) that made them, and the big uses' summed products.
    Holds no reference to the weight or its alias, so the autograd nodes that hold it make no reference cycle
    (which would keep each forward's merged weight copies alive until Python's cycle collector ran)."""

    def __init__(self):
        self.kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.grad_weight: torch.Tensor | None = None
        self.grad_bias: torch.Tensor | None = None
        self.task: int | None = None  # the backward the summed products belong to

    def add(self, x: torch.Tensor, grad_output: torch.Tensor, weight: bool, bias: bool) -> None:
        """One use's input and output gradient, both (rows, features): kept (`kept_to_the_end`), else summed now."""
        task = torch._C._current_graph_task_id()  # as torch.utils.checkpoint tells backward calls apart
        if self.task != task:  # an earlier backward that never reached the weight (autograd.grad of inputs only)
            self.grad_weight = self.grad_bias = None
            self.task = task
        if kept_to_the_end(x.shape[0], x.shape[1], grad_output.shape[1]):
            self.kept.append((task, x, grad_output))
        else:
            self._accumulate(x, grad_output, weight, bias)

    def _accumulate(self, x: torch.Tensor, grad_output: torch.Tensor, weight: bool, bias: bool) -> None:
        if weight:
            if self.grad_weight is None:
                self.grad_weight = grad_output.t() @ x
            else:
                self.grad_weight.addmm_(grad_output.t(), x)
        if bias:
            summed = grad_output.sum(0)
            self.grad_bias = summed if self.grad_bias is None else self.grad_bias.add_(summed)

    def take(self, weight: bool, bias: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """This backward's summed gradients (the kept uses as one product), forgetting everything kept so far."""
        task = torch._C._current_graph_task_id()
        if self.task != task:
            self.grad_weight = self.grad_bias = None
        kept = [(x, g) for t, x, g in self.kept if t == task]
        if kept:
            self._accumulate(torch.cat([x for x, _ in kept]), torch.cat([g for _, g in kept]), weight, bias)
        grads = (self.grad_weight if weight else None, self.grad_bias if bias else None)
        self.kept, self.grad_weight, self.grad_bias, self.task = [], None, None, None
        return grads


class SharedWeight:
    """``weight`` (out, in) and ``bias`` (out,) or None, used by several products (`__call__`) whose weight and
    bias gradients are summed as described in the module docstring. Build one per forward."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self._uses = _Uses()
        self._given = [weight]  # what the uses save (the module docstring says why not the alias)
        # aliases of weight and bias whose node runs after every use's backward (see _Gather)
        if bias is None:
            self.weight, self.bias = _Gather.apply(self._uses, weight), None
        else:
            self.weight, self.bias = _Gather.apply(self._uses, weight, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (*rows, in) @ weight.T + bias: (*rows, out)."""
        return _SharedLinear.apply(self._uses, x, self.weight, self.bias, self._given)


class _Gather(torch.autograd.Function):
    """Identity on (weight[, bias]); its backward returns the shared gradients. Every use takes these outputs as
    inputs, so autograd runs this node only after all of their backward nodes."""

    @staticmethod
    def forward(ctx, uses: _Uses, *tensors):
        ctx.uses = uses
        ctx.set_materialize_grads(False)  # the uses return no weight gradient: no zero-filled weight for nothing
        return tensors if len(tensors) > 1 else tensors[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *direct):
        needs = ctx.needs_input_grad[1:]
        grads = ctx.uses.take(needs[0], len(needs) > 1 and needs[1])
        # a gradient that reached the aliases other than through the shared products (none in this engine)
        grads = [g if d is None else (d if g is None else g + d) for g, d in zip(grads, direct)]
        return (None, *grads[: len(needs)])


class _SharedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, uses: _Uses, x, weight, bias, given: list[torch.Tensor]):
        """``weight`` and ``bias``: the aliases (their gradients come from `_Gather`); ``given[0]``: the weight as
        given, which the backward reads (the module docstring says why), passed in a list so that it is no input."""
        ctx.uses = uses
        ctx.save_for_backward(x, given[0])
        # torch's own product: under ZeRO-3 `F.linear` is DeepSpeed's autograd function, needless here
        return _TORCH_LINEAR(x, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        rows = grad_output.reshape(-1, grad_output.shape[-1])
        grad_x = (rows @ weight.detach()).view(x.shape) if ctx.needs_input_grad[1] else None
        need_weight, need_bias = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if need_weight or need_bias:
            ctx.uses.add(x.reshape(-1, x.shape[-1]), rows, need_weight, need_bias)
        return None, grad_x, None, None, None
