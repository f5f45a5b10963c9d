"""Kronecker-factored forward for peft's LoKr Linear layers.

peft builds the full `kron(w1, w2)` delta weight on every forward and multiplies the input by it: an extra
full-size matmul forward, two in backward, and every delta kept alive for the backward. For W = kron(w1, w2)
with w1: (a, c), w2: (b, d), in = c * d and out = a * b, the same product is
`y[..., i*b + j] = sum_{k,l} w1[i, k] * w2[j, l] * x[..., k*d + l]`, i.e. two small contractions over the
input viewed as (..., c, d). Only the forward of the delta changes: the parameters, their names, the scaling,
merge / unmerge and the random draws (module dropout, then rank dropout) stay peft's, so checkpoints are
identical and a run gives peft's weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, torch.kron(w1, w2))` without forming the product; the cheaper contraction order first."""
    (a, c), (b, d) = w1.shape, w2.shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, c, d)
    if c * b * (d + a) <= a * d * (c + b):
        # w2 over d first: (n, c, d) @ (d, b) -> (n, c, b); then w1 over c -> (n, b, a).
        z = xs @ w2.t()
        y = (z.transpose(1, 2) @ w1.t()).transpose(1, 2)
    else:
        # w1 over c first: (n, d, c) @ (c, a) -> (n, d, a); then w2 over d -> (n, a, b).
        z = xs.transpose(1, 2) @ w1.t()
        y = z.transpose(1, 2) @ w2.t()
    return y.reshape(*lead, a * b)


def _factors(layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w1 and w2 as peft's get_delta_weight forms them (both small: about sqrt(out) x sqrt(in))."""
    w1 = layer.lokr_w1[adapter] if adapter in layer.lokr_w1 else layer.lokr_w1_a[adapter] @ layer.lokr_w1_b[adapter]
    w2 = layer.lokr_w2[adapter] if adapter in layer.lokr_w2 else layer.lokr_w2_a[adapter] @ layer.lokr_w2_b[adapter]
    return w1, w2


@functools.cache
def _factored_class(linear: type) -> type:
    class FactoredLinear(linear):
        """peft's LoKr Linear whose delta activations never form kron(w1, w2)."""

        def _get_delta_activations(self, adapter_name: str, input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            w1, w2 = _factors(self, adapter_name)
            # peft scales kron(w1, w2); scaling the smaller factor gives the same product.
            w1 = w1 * self.scaling[adapter_name]
            y = kron_linear(self._cast_input_dtype(input, w1.dtype), w1, w2)
            if self.training and bool(self.rank_dropout[adapter_name]):
                # peft drops rows (outputs) of the delta weight: one CPU draw of out_features values, as there.
                drop = (torch.rand(y.shape[-1]) > self.rank_dropout[adapter_name]).float()
                if self.rank_dropout_scale[adapter_name]:
                    drop /= drop.mean()
                y = y * drop.to(device=y.device, dtype=y.dtype)
            return y

    FactoredLinear.__name__ = FactoredLinear.__qualname__ = linear.__name__
    return FactoredLinear


def use_factored_forward(model: nn.Module) -> int:
    """Switch every peft LoKr Linear in `model` to the factored forward (a subclass, swapped in place);
    returns how many. Conv layers keep peft's own path."""
    from peft.tuners.lokr.layer import Linear

    return swap_class(model, Linear, _factored_class(Linear))


def swap_class(model: nn.Module, layer_type: type, replacement: type) -> int:
    """Give every module of exactly `layer_type` in `model` the class `replacement` (a subclass with another
    forward; parameters and state untouched); returns how many."""
    count = 0
    for module in model.modules():
        if type(module) is layer_type:
            module.__class__ = replacement
            count += 1
    return count


FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def fit_factors(peft_model: nn.Module, state: dict[str, torch.Tensor], adapter: str = "default") -> list[str]:
    """Give each LoKr layer the factor parameters `state` (peft keys) stores for it, where peft built others.

    peft derives every layer's factors from one decompose_factor and its rank: a file from LyCORIS with
    unbalanced_factorization, a factor above sqrt(dim) in LyCORIS's order, or a full factor where peft's rule
    splits, has factors it cannot build. kron(w1, w2) reshaped to the weight is the delta whatever the factors'
    sides, so peft's forward, merge and state dict (and the factored forward) work on any pair whose product has
    the weight's shape. Returns the modules refitted (empty when peft built the stored layout)."""
    from peft.tuners.lokr.layer import LoKrLayer

    stored: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, value in state.items():
        module, _, suffix = key.removeprefix("base_model.model.").rpartition(".")
        if suffix in FACTORS:
            stored.setdefault(module, {})[suffix] = tuple(value.shape)
    refitted = []
    for name, layer in peft_model.get_base_model().named_modules():
        if not isinstance(layer, LoKrLayer) or name not in stored or adapter not in layer.r:
            continue
        shapes = stored[name]
        built = {s: tuple(getattr(layer, s)[adapter].shape) for s in FACTORS if adapter in getattr(layer, s)}
        if built == shapes:
            continue
        device = layer.get_base_layer().weight.device
        trainable = any(getattr(layer, s)[adapter].requires_grad for s in built)
        for suffix in FACTORS:
            params = getattr(layer, suffix)
            if adapter in params:
                del params[adapter]
            if suffix in shapes:
                params[adapter] = nn.Parameter(torch.zeros(shapes[suffix], device=device), requires_grad=trainable)
        refitted.append(name)
    return refitted
