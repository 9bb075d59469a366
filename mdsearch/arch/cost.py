"""Cost model: parameters and multiply-accumulates (MACs) of a spec, with no real weights.

The model is built on PyTorch's meta device (shapes only, no memory, no arithmetic) and run once
under a dispatch mode that counts the MACs of every matmul and convolution as it is dispatched.
Counting follows fvcore's convention: one multiply-add counts 1, and every matmul counts,
including attention scores (QK^T) and attention-weighted values (AV), whether they run inside
`scaled_dot_product_attention` or as explicit matmuls (relu attention). Norms, activations and
other element-wise ops are not counted (fvcore counts norms too; they are well under 1% here).

Because the counted model is the built model, the cost can never drift from the builder.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from math import prod

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .spec import ArchSpec, SpecError
from .unet import MICRO_COND_SCALARS, Block, UNet, build

VAE_FACTOR = 8  # latent diffusion with an f=8 autoencoder (SD, and the paper)

aten = torch.ops.aten


def _mm(args, out):  # (n, k) @ (k, m); addmm's matrices are args 1 and 2
    a, b = (args[0], args[1]) if len(args) == 2 else (args[1], args[2])
    return a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(args, out):  # (B, n, k) @ (B, k, m); baddbmm's are args 1 and 2
    a, b = (args[0], args[1]) if len(args) == 2 else (args[1], args[2])
    return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _conv(args, out):
    weight, transposed = args[1], args[6]
    out = out[0] if isinstance(out, (tuple, list)) else out
    if transposed:  # each input position is scattered through the whole kernel
        return args[0].numel() * weight.shape[1] * prod(weight.shape[2:])
    return out.numel() * prod(weight.shape[1:])


def _sdpa(args, out):  # scores (L x S x d) plus weighted values (L x S x dv), per batch and head
    q, k, v = args[:3]
    return prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


_RULES = {
    aten.mm: ("linear", _mm), aten.addmm: ("linear", _mm),
    aten.bmm: ("attention", _bmm), aten.baddbmm: ("attention", _bmm),
    aten.convolution: ("conv", _conv),
}
for _name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
    if hasattr(aten, _name):
        _RULES[getattr(aten, _name)] = ("attention", _sdpa)


# On the meta device only shapes matter. PyTorch's meta kernels for these ops run Python shape
# checks that take most of the cost model's time, so outputs of the right shape are made directly.
def _norm_out(x, stats_shape):
    return x.new_empty(x.shape), x.new_empty(stats_shape), x.new_empty(stats_shape)


_META_SHORTCUTS = {
    aten.native_layer_norm.default:  # (x, normalized_shape, w, b, eps) -> out, mean, rstd
        lambda x, shape, *_: _norm_out(x, x.shape[:x.dim() - len(shape)] + (1,) * len(shape)),
    aten.native_group_norm.default:  # (x, w, b, N, C, HxW, groups, eps) -> out, mean, rstd
        lambda x, w, b, n, c, hw, groups, eps: _norm_out(x, (n, groups)),
    aten._safe_softmax.default: lambda x, *_: x.new_empty(x.shape),
    aten._softmax.default: lambda x, *_: x.new_empty(x.shape),
    aten.addmm.default: lambda bias, a, b, **_: a.new_empty((a.shape[0], b.shape[1])),
}


class MacCounter(TorchDispatchMode):
    """Counts MACs of matmuls, convolutions and fused attention, by kind."""

    def __init__(self):
        super().__init__()
        self.macs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shortcut = _META_SHORTCUTS.get(func)
        if shortcut and not args[0].is_meta:
            shortcut = None
        out = shortcut(*args, **(kwargs or {})) if shortcut else func(*args, **(kwargs or {}))
        rule = _RULES.get(func.overloadpacket)
        if rule is not None:
            kind, count = rule
            self.macs[kind] += count(args, out)
        return out


@dataclass
class Cost:
    name: str
    resolution: int
    latent_size: int
    params: int
    gmacs: float
    conv_blocks: int
    sa_layers: int
    ca_layers: int
    channels: list[int]
    gmacs_by_kind: dict[str, float] = field(default_factory=dict)  # conv, linear, attention

    def to_dict(self) -> dict:
        return asdict(self)


def latent_size(spec: ArchSpec, resolution: int) -> int:
    """The latent side for an image `resolution`, checked against the UNet's depth."""
    if resolution < 1 or resolution % VAE_FACTOR:
        raise SpecError(f"resolution {resolution}: must be a positive multiple of {VAE_FACTOR} "
                        f"(the autoencoder's downsampling factor)")
    latent, factor = resolution // VAE_FACTOR, 2 ** (len(spec.levels) - 1)
    if latent % factor:
        raise SpecError(f"resolution {resolution}: latent size {latent} is not divisible by "
                        f"2^(levels-1) = {factor} for spec {spec.name!r} with "
                        f"{len(spec.levels)} levels")
    return latent


def example_inputs(spec: ArchSpec, latent: int, batch: int = 1, device="cpu") -> tuple:
    """(latents, timesteps, context) and SD-XL's extra conditions, shaped for `spec`."""
    kwargs = {}
    if spec.pooled_dim:
        kwargs["pooled"] = torch.zeros(batch, spec.pooled_dim, device=device)
    if spec.micro_cond_dim:
        kwargs["micro_cond"] = torch.zeros(batch, MICRO_COND_SCALARS, device=device)
    return (torch.randn(batch, spec.latent_channels, latent, latent, device=device),
            torch.full((batch,), 500.0, device=device),
            torch.randn(batch, spec.context_len, spec.context_dim, device=device)), kwargs


class BlockCosts:
    """Parameters and MACs of the levels' blocks, by block configuration and input shapes.

    Screening a search space costs thousands of specs that share most of their blocks; with a
    cache, `cost` builds and runs each distinct block once (on the meta device, counted exactly
    as in the full model) and every later spec only assembles the rest of the UNet around
    stand-ins that return the cached counts. The totals equal the uncached count (tested)."""

    def __init__(self):
        self.params: dict[str, int] = {}
        self.macs: dict[tuple, tuple[Counter, tuple]] = {}  # -> (MACs by kind, output shape)


def _fields(obj, skip=()) -> str:
    """A dataclass's own fields as text (nested dataclasses by their repr, which lists theirs)."""
    return repr([(f.name, getattr(obj, f.name)) for f in fields(obj) if f.name not in skip])


def _block_key(spec_fields: str, level, path, cin: int, cout: int) -> str:
    """Everything a Block's construction reads: the spec's global fields (`spec_fields`), its
    level's and path's fields, its channels."""
    return "|".join((spec_fields, _fields(level, ("down", "up")), _fields(path), str(cin),
                     str(cout)))


def _cached_block(cache: BlockCosts, spec_fields: str, counter: MacCounter):
    """A stand-in for unet.Block that counts from `cache`, building the real block on a miss."""

    class CachedBlock(torch.nn.Module):
        def __init__(self, spec, level, path, cin, cout):
            super().__init__()
            self.key = _block_key(spec_fields, level, path, cin, cout)
            self.args = (spec, level, path, cin, cout)
            if self.key not in cache.params:
                cache.params[self.key] = sum(p.numel() for p in self.make().parameters())
            self.num_params = cache.params[self.key]

        def make(self) -> Block:
            with torch.device("meta"):
                return Block(*self.args)

        def forward(self, x, temb, context):
            key = (self.key, tuple(x.shape), tuple(temb.shape), tuple(context.shape))
            if key not in cache.macs:
                before = Counter(counter.macs)
                out = self.make()(x, temb, context)  # counted by the mode in progress
                cache.macs[key] = (counter.macs - before, tuple(out.shape))
                return out
            macs, shape = cache.macs[key]
            counter.macs.update(macs)
            return x.new_empty(shape)

    return CachedBlock


def cost(spec: ArchSpec, resolution: int = 512, cache: BlockCosts | None = None) -> Cost:
    """Parameters and GMACs of one forward pass (batch 1) at an image `resolution`. With a
    `cache` (a BlockCosts shared across calls), blocks seen before are not rebuilt."""
    latent = latent_size(spec, resolution)
    counter = MacCounter()
    with torch.device("meta"):
        if cache is None:
            model = build(spec)
        else:  # the global fields' text once per spec: part of every block's key
            block = _cached_block(cache, _fields(spec, ("name", "levels")), counter)
            model = UNet(spec, block=block)
        args, kwargs = example_inputs(spec, latent, device="meta")
    params = sum(p.numel() for p in model.parameters())
    params += sum(m.num_params for m in model.modules() if hasattr(m, "num_params"))
    with torch.no_grad(), counter:
        model(*args, **kwargs)
    by_kind = {k: counter.macs[k] / 1e9 for k in ("conv", "linear", "attention")}
    return Cost(name=spec.name, resolution=resolution, latent_size=latent, params=params,
                gmacs=sum(by_kind.values()), **spec.counts(), channels=list(spec.channels),
                gmacs_by_kind=by_kind)


def _fvcore_sdpa_macs(inputs, outputs):
    """fvcore skips aten::scaled_dot_product_attention unless given a handle: QK^T plus AV."""
    q, k, v = (i.type().sizes() for i in inputs[:3])
    return prod(q[:-1]) * k[-2] * (q[-1] + v[-1])


def fvcore_count(spec: ArchSpec, resolution: int = 512, seed: int = 0) -> dict[str, float]:
    """The independent cross-check: fvcore's FlopCountAnalysis on the real model and real tensors
    (slow; allocates the weights). MACs by kind as `cost` names them, plus fvcore's `total`,
    which also counts norms and upsampling element-wise."""
    from fvcore.nn import FlopCountAnalysis

    torch.manual_seed(seed)
    model = build(spec).eval()
    args, kwargs = example_inputs(spec, latent_size(spec, resolution))
    analysis = FlopCountAnalysis(model, args + tuple(kwargs.values()))  # positional inputs only
    analysis.set_op_handle("aten::scaled_dot_product_attention", _fvcore_sdpa_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    return {"conv": by_op.get("conv", 0), "linear": by_op.get("linear", 0),
            "attention": by_op.get("scaled_dot_product_attention", 0) + by_op.get("matmul", 0),
            "total": analysis.total()}
