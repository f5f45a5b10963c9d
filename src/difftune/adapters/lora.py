"""A leaner forward for peft's LoRA Linear layers.

peft adds the adapter as `result + lora_B(lora_A(dropout(x))) * scaling`: three full-size (tokens x out)
tensors written forward (B's product, its scaled copy, the sum) and one more backward (the gradient times
scaling), for a rank-r update whose own FLOPs are ~1 % of the layer's. On the CPU at Stable Cascade's size
those elementwise passes, not the FLOPs, are most of the adapter's cost. Here the scaling goes on the small
(out x r) factor and the up-projection is added into the base output by one in-place addmm: no full-size
tensor written forward beyond the base output, none for the scaling backward. Parameters, names, dropout
draws, merge / unmerge and every other case (adapters disabled or merged, several adapters, mixed batches,
DoRA and other variants, lora_bias, a dtype mismatch between the base output and the adapter) stay peft's
own code, so checkpoints are identical.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from difftune.adapters.lokr import swap_class


@functools.cache
def _lean_class(linear: type) -> type:
    class LeanLinear(linear):
        """peft's LoRA Linear adding its update with one in-place addmm."""

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            active = [name for name in self.active_adapters if name in self.lora_A]
            if self.disable_adapters or self.merged or args or kwargs or len(active) != 1:
                return super().forward(x, *args, **kwargs)
            name = active[0]
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            if name in self.lora_variant or lora_B.bias is not None:
                return super().forward(x, *args, **kwargs)
            self._check_forward_args(x)
            flat = x.reshape(-1, x.shape[-1])
            result = self.base_layer(flat)
            h = lora_A(self.lora_dropout[name](self._cast_input_dtype(flat, lora_A.weight.dtype)))
            if h.dtype != result.dtype:  # peft's own expression: it promotes, then casts back
                result = (result + lora_B(h) * self.scaling[name]).to(result.dtype)
            else:
                scaling = self.scaling[name]
                up = lora_B.weight if scaling == 1 else lora_B.weight * scaling
                # No backward needs the frozen base layer's output, so the update goes into it in place; into
                # the 2-D tensor itself, as an in-place op on a view would copy the gradient backward. In-place
                # ops escape autocast: the factor takes the output's dtype as autocast's addmm would.
                result.addmm_(h, up.t().to(result.dtype))
            return result.view(*x.shape[:-1], result.shape[-1])

    LeanLinear.__name__ = LeanLinear.__qualname__ = linear.__name__
    return LeanLinear


def use_lean_forward(model: nn.Module) -> int:
    """Switch every peft LoRA Linear in `model` to the lean forward (a subclass, swapped in place); returns how
    many. Other LoRA layer types (Conv, Embedding) keep peft's forward."""
    from peft.tuners.lora.layer import Linear

    return swap_class(model, Linear, _lean_class(Linear))
