"""Several training seeds of one UNet as one model: `SeedStack`.

    stack = SeedStack.build(spec, seeds=[0, 1, 2, 3])   # seed s initialised as build(spec) after
                                                        # torch.manual_seed(s)
    out = stack(latents, t, context)                    # (K, B, ...) in, (K, B, ...) out
    stack.unet(2)                                       # seed 2 as a plain UNet (a copy)

With K > 1 every parameter carries a leading seed dimension (K, ...) and one call runs all K
copies with `torch.func.vmap` over `functional_call` of the same builder's UNet: the batched
kernels are the vmap rules of each op (a convolution with per-seed weights becomes one grouped
convolution, a linear layer one batched matmul, a norm one call over K x B items). Attention is
computed as two matmuls there (`Attention.kernel = "matmul"`): PyTorch's fused attention has no
vmap rule and would run seed by seed. Since every op is elementwise in the seed dimension, the
gradient of the summed per-seed losses is each seed's own gradient, and AdamW, EMA and weight
decay (elementwise) keep the seeds independent; only gradient clipping needs a per-seed norm
(`clip_grad_norm_`).

With K = 1 the stack is the UNet itself, unstacked: the same parameters, state dict and kernels
as a plain run, so a one-seed run is bit for bit what it was before stacks existed.

A seed inside a stack is the same experiment as that seed alone (tests/test_seeds.py): the same
initialisation; the trainer draws its data, timesteps and noise from (seed, step). Its numbers
equal the solo run's to float tolerance, not bit for bit: batched kernels sum in another order.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks import set_attn_kernel
from .spec import ArchSpec
from .unet import UNet, build


class SeedStack(nn.Module):
    def __init__(self, models: list[UNet], seeds: list[int]):
        super().__init__()
        if len(models) != len(seeds) or not models:
            raise ValueError("a SeedStack needs one model per seed, and at least one")
        self.seeds = list(seeds)
        if len(models) == 1:
            self.single = models[0]
            return
        self.single = None
        self.names = [name for name, _ in models[0].named_parameters()]
        stacked = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models])
                   for name in self.names}
        # nn.Module names cannot hold dots: the stacked tensors are kept under "/"-joined names
        self.stacked = nn.ParameterDict({name.replace(".", "/"): nn.Parameter(w)
                                         for name, w in stacked.items()})
        # the template holds the structure only (on the meta device: no memory); functional_call
        # runs it on each seed's slice of the stacked tensors
        self.template = [copy.deepcopy(models[0]).to("meta")]  # a list: not a submodule
        set_attn_kernel(self.template[0], "matmul")

    @classmethod
    def build(cls, spec: ArchSpec, seeds: list[int], device: torch.device | str = "cpu"):
        """K models of `spec`, seed s initialised exactly as `build(spec)` after
        `torch.manual_seed(s)`."""
        models = []
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(build(spec))
        return cls(models, seeds).to(device)

    @property
    def count(self) -> int:
        return len(self.seeds)

    @property
    def structure(self) -> UNet:
        """The UNet whose structure every seed shares (its attention switches apply to all)."""
        return self.single if self.single is not None else self.template[0]

    def weights(self) -> dict[str, torch.Tensor]:
        """Stacked parameters by the UNet's own names, (K, ...) each."""
        return {name: self.stacked[name.replace(".", "/")] for name in self.names}

    def forward(self, latents, timesteps, context):
        """latents (K, B, C, H, W), timesteps (K, B), context (K, B, L, D) -> (K, B, C, H, W):
        seed k's model on its own slice."""
        if self.single is not None:
            return self.single(latents[0], timesteps[0], context[0])[None]
        template = self.template[0]

        def one(weights, x, t, c):
            return torch.func.functional_call(template, weights, (x, t, c))

        return torch.func.vmap(one)(self.weights(), latents, timesteps, context)

    def unet(self, k: int) -> UNet:
        """Seed k's weights as a plain UNet (the module itself for a one-seed stack, else a copy
        on the stack's device)."""
        if self.single is not None:
            if k != 0:
                raise IndexError(f"seed index {k} of a one-seed stack")
            return self.single
        model = copy.deepcopy(self.template[0])
        set_attn_kernel(model, "sdpa")
        device = next(iter(self.stacked.values())).device
        model = model.to_empty(device=device)
        model.load_state_dict({name: w[k].detach() for name, w in self.weights().items()})
        return model.train(self.training)

    def seed_grad_norms(self) -> torch.Tensor:
        """Each seed's global gradient norm, (K,) (a parameter without a gradient counts 0;
        a stack of K > 1: one seed alone uses torch's clip_grad_norm_)."""
        grads = [w.grad for w in self.stacked.values() if w.grad is not None]
        per = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads])
        return torch.linalg.vector_norm(per, dim=0)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Per-seed gradient clipping: each seed's gradient scaled to a norm of at most
        `max_norm`, as clip_grad_norm_ would in a solo run. Returns the norms before clipping."""
        if self.single is not None:
            return torch.nn.utils.clip_grad_norm_(self.single.parameters(), max_norm).reshape(1)
        norms = self.seed_grad_norms()
        scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for w in self.stacked.values():
            if w.grad is not None:
                w.grad.mul_(scale.reshape(-1, *[1] * (w.grad.dim() - 1)).to(w.grad.dtype))
        return norms

    @torch.no_grad()
    def zero_seed_grads_(self, dead: torch.Tensor) -> None:
        """Drop the gradients of the seeds where `dead` (K,) is true (a failed seed's non-finite
        gradient must not reach the optimiser's moments; its weights are no longer judged)."""
        if self.single is not None or not bool(dead.any()):
            return
        for w in self.stacked.values():
            if w.grad is not None:
                w.grad[dead] = 0
