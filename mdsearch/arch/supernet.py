"""The elastic supernet: one set of weights holding every configuration of a search space (issue
27; SnapFusion's robust training, OFA / BigNAS slicing). This module is the weight sharing; the
training, scoring and evolution that use it build on it.

    super_spec = supernet_spec(specs)              # the union of the configurations
    net = build_supernet(super_spec)               # the shared weights
    weights = subnet_weights(net, sub_spec)        # slices of them: gradients reach `net`
    out = run_subnet(net, sub_spec, x, t, context) # the configuration's forward on them
    model = extract(net, sub_spec)                 # a plain UNet (copied weights): export takes it

Where a configuration sits in the supernet:

- widths (a level's channels, the FFN expansion, a separable block's expansion): the leading
  channels; attention heads keep their width, so the first channels are the first heads. A GLU
  FFN's input projection holds [value | gate]: the leading units of each half.
- depth: the first n conv blocks of a path, the first n transformer layers of a stage.
- self- or cross-attention off: that attention module is not used (its weights stay).
- an up block's input is [x, skip] concatenated: the leading channels of each part.
- a block's residual shortcut is a 1x1 conv where the configuration's block changes width and
  the identity where it does not, exactly as in the plain UNet; the supernet holds a 1x1 conv at
  every block, used by the configurations that need it.

A sub-network is exactly `build(sub_spec)` with these slices as its weights, so what is scored
on the supernet is a plain model. Fields that slicing cannot express (conv type, kernel size,
K/V sharing, activation, attention nonlinearity, mid block type, head width, normalisation
groups, conditioning sizes, the number of levels) must be equal across the configurations; a
space that varies one is refused naming it.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .blocks import GatedFFN, ResBlock, SeparableBlock
from .spec import ArchSpec, Level, Path, SpecError
from .unet import Block, UNet

ELASTIC_SPEC = {"ffn_expansion": max, "mid_layers": max}  # ArchSpec fields that may vary
ELASTIC_LEVEL = {"channels": max, "conv_expansion": max}
ELASTIC_PATH = {"conv_blocks": max, "layers": max, "self_attn": any, "cross_attn": any}
IGNORED = {"name"}


class SupernetError(SpecError):
    """A space (or a configuration) the supernet cannot hold; the message names the field."""


def _union(values: list, field: str, elastic: dict, where: str):
    if field in elastic:
        return elastic[field](values)
    if any(v != values[0] for v in values):
        shown = sorted({repr(v) for v in values})[:2]
        raise SupernetError(f"{where}{field}: the configurations differ ({' vs '.join(shown)}), "
                            "and a supernet's shared weights cannot hold both: vary it by "
                            "separate sweeps, or fix it in the space")
    return values[0]


def supernet_spec(specs: list[ArchSpec]) -> ArchSpec:
    """The spec every one of `specs` is a sub-network of: the largest value of every elastic
    field (widths, depths, expansions; attention on if any configuration has it)."""
    if not specs:
        raise SupernetError("no configurations to build a supernet of")
    data = {}
    for f in dataclasses.fields(ArchSpec):
        if f.name in IGNORED or f.name == "levels":
            continue
        data[f.name] = _union([getattr(s, f.name) for s in specs], f.name, ELASTIC_SPEC, "")
    _union([len(s.levels) for s in specs], "levels", {}, "number of ")
    levels = []
    for i in range(len(specs[0].levels)):
        group = [s.levels[i] for s in specs]
        level = {}
        for f in dataclasses.fields(Level):
            if f.name in ("down", "up"):
                paths = [getattr(lv, f.name) for lv in group]
                level[f.name] = Path(**{
                    p.name: _union([getattr(x, p.name) for x in paths], p.name, ELASTIC_PATH,
                                   f"levels.{i}.{f.name}.") for p in dataclasses.fields(Path)})
            else:
                level[f.name] = _union([getattr(lv, f.name) for lv in group], f.name,
                                       ELASTIC_LEVEL, f"levels.{i}.")
        levels.append(Level(**level))
    spec = ArchSpec(name="supernet", levels=levels, **data)
    spec.validate("supernet")
    return spec


class _SupernetBlock(Block):
    """A block with a 1x1 shortcut even where the largest configuration keeps the width: a
    smaller configuration may change the width there."""

    def __init__(self, spec, level, path, cin, cout):
        super().__init__(spec, level, path, cin, cout)
        if isinstance(self.conv.shortcut, nn.Identity):
            self.conv.shortcut = nn.Conv2d(cin, cout, 1)


def build_supernet(spec: ArchSpec) -> UNet:
    """The supernet's weights for `supernet_spec(...)`: a parameter store; its configurations
    run through `run_subnet` (its own forward is not one of them)."""
    return UNet(spec, block=_SupernetBlock)


def sub_model(sub_spec: ArchSpec) -> UNet:
    """The configuration's module tree without memory (its weights come from the supernet)."""
    with torch.device("meta"):
        return UNet(sub_spec)


def _parts(n_sub: tuple[int, int], n_super: tuple[int, int], where: str) -> torch.Tensor:
    """Indices of a [x, skip] input's sub channels among the supernet's."""
    (x, skip), (x_super, skip_super) = n_sub, n_super
    if x > x_super or skip > skip_super:
        raise SupernetError(f"{where}: an input of {x} + {skip} skip channels, the supernet's "
                            f"takes {x_super} + {skip_super}: not a sub-network of it")
    return torch.cat([torch.arange(x), x_super + torch.arange(skip)])


def _slice(weight: torch.Tensor, shape: torch.Size, special: dict[int, torch.Tensor],
           name: str) -> torch.Tensor:
    for dim, size in enumerate(shape):
        if size > weight.shape[dim]:
            raise SupernetError(f"{name}: the configuration needs {size} along dim {dim}, the "
                                f"supernet holds {weight.shape[dim]}: not a sub-network of it")
        if dim in special:
            weight = weight.index_select(dim, special[dim].to(weight.device))
        elif size < weight.shape[dim]:
            weight = weight.narrow(dim, 0, size)
    if weight.shape != shape:
        raise SupernetError(f"{name}: sliced to {tuple(weight.shape)}, the configuration needs "
                            f"{tuple(shape)}")
    return weight


def subnet_weights(net: UNet, sub_spec: ArchSpec, sub: UNet | None = None
                   ) -> dict[str, torch.Tensor]:
    """The configuration's parameters as slices of the supernet's (differentiable: a loss on
    them trains the supernet), by the names `build(sub_spec)` gives them."""
    sub = sub if sub is not None else sub_model(sub_spec)
    shared = dict(net.named_parameters())
    out = {}
    for mname, module in sub.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        special_of = _special(sub, net, mname, module)
        for pname, param in own:
            name = f"{mname}.{pname}" if mname else pname
            if name not in shared:
                raise SupernetError(f"{name}: the configuration has it, the supernet does not: "
                                    "not a sub-network of it")
            out[name] = _slice(shared[name], param.shape, special_of(pname), name)
    return out


def _special(sub: UNet, net: UNet, mname: str, module: nn.Module):
    """pname -> {dim: indices} for the parameters of `module` (at `mname`) that are not leading
    slices of the supernet's."""
    if isinstance(module, GatedFFN) or not mname:
        return lambda pname: {}
    parent_name, _, child = mname.rpartition(".")
    holder = sub.get_submodule(parent_name) if parent_name else sub
    if isinstance(holder, GatedFFN) and child == "proj_in":
        inner_sub = module.out_features // 2
        inner_super = net.get_submodule(mname).out_features // 2
        halves = torch.cat([torch.arange(inner_sub), inner_super + torch.arange(inner_sub)])
        return lambda pname: {0: halves}
    if not isinstance(holder, (ResBlock, SeparableBlock)):
        return lambda pname: {}
    block_name = parent_name.rpartition(".")[0]  # the Block holding `holder` as .conv
    sub_block, super_block = sub.get_submodule(block_name), net.get_submodule(block_name)
    index = _parts(sub_block.in_parts, super_block.in_parts, block_name)
    if isinstance(holder, ResBlock):
        dims = {"norm1": {0}, "conv1": {1}, "shortcut": {1}}.get(child, set())
    else:
        dims = {"norm": {0}, "depthwise": {0}, "time": {0}, "expand": {1},
                "shortcut": {1}}.get(child, set())
    return lambda pname: {d: index for d in dims if pname == "weight" or d == 0}


def run_subnet(net: UNet, sub_spec: ArchSpec, *inputs, sub: UNet | None = None):
    """The configuration's forward pass on the supernet's weights."""
    sub = sub if sub is not None else sub_model(sub_spec)
    return torch.func.functional_call(sub, subnet_weights(net, sub_spec, sub), inputs)


def extract(net: UNet, sub_spec: ArchSpec) -> UNet:
    """The configuration as a plain UNet, its weights copied out of the supernet."""
    model = UNet(sub_spec)
    with torch.no_grad():
        weights = subnet_weights(net, sub_spec)
        model.load_state_dict({k: v.detach().clone() for k, v in weights.items()})
    return model.to(next(net.parameters()).device)
