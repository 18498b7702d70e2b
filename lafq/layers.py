"""A model's layer vocabulary, from its parameter names and shapes: what policies, plots and reports ask
instead of a model's own names.

    layers = layers_of(param_shapes(model))
    layers.layer(name)     the layer a weight tensor belongs to
    layers.order           the layers in the order the sample flows through them
    layers.groups          {"encoder": (...), "mid": (...), "decoder": (...)}: every layer in one group
    layers.edges           (first, last): the layers that touch the input and the output

The project U-Net (its top-level modules `embed`, `stem`, `down1`..`down3`, `mid`, `up3`..`up1`, `head`) keeps
its own: layers are those modules, edges `stem` and `head` (its first and last convolutions), groups as
the source research split them. Any other model (diffusers U-Nets and transformers, any `nn.Module`):
a layer is the first two components of a tensor's module path (`down_blocks.0`, `mid_block.attentions`,
`transformer_blocks.3`, `conv_in`), in parameter order with a U-Net's `mid_block` moved before its
`up_blocks` (diffusers registers it after them); `mid` is the `mid_block` layers, or for a model without
one the middle layer of the order; the edges are the layers of the first and last matrix-shaped tensors
(`conv_in` / `conv_out`, a DiT's patch embedding / output projection).
"""
from __future__ import annotations

from dataclasses import dataclass

GROUPS = ("encoder", "mid", "decoder")


@dataclass(frozen=True)
class Layers:
    of: dict  # tensor name -> layer, in model order
    order: tuple[str, ...]
    groups: dict  # group -> tuple of layers (GROUPS, each layer in exactly one)
    edges: tuple[str, str]

    def layer(self, name: str) -> str:
        return self.of[name] if name in self.of else _module_key(name)

    def members(self) -> dict[str, list[str]]:
        """layer -> its tensors, layers in `order`."""
        out: dict[str, list[str]] = {layer: [] for layer in self.order}
        for n, layer in self.of.items():
            out[layer].append(n)
        return out

    def group_of(self, layer: str) -> str | None:
        return next((g for g, members in self.groups.items() if layer in members), None)

    def in_group(self, group: str) -> set[str]:
        """The tensors of one group's layers (e.g. "mid": what 'protect the middle block' keeps)."""
        wanted = set(self.groups.get(group, ()))
        return {n for n, layer in self.of.items() if layer in wanted}


UNET_LAYERS = ("embed", "stem", "down1", "down2", "down3", "mid", "up3", "up2", "up1", "head")
UNET_GROUPS = {"encoder": ("embed", "stem", "down1", "down2", "down3"), "mid": ("mid",),
               "decoder": ("up3", "up2", "up1", "head")}


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _module_key(name: str) -> str:
    """The first two components of the module path (the parameter's own name dropped)."""
    return ".".join(name.split(".")[:-1][:2]) or name


def _down_mid_up(keys: list[str]) -> list[str]:
    mid = [k for k in keys if k.startswith("mid_block")]
    rest = [k for k in keys if k not in mid]
    at = next((i for i, k in enumerate(rest) if k.startswith("up_blocks")), len(rest))
    return rest[:at] + mid + rest[at:]


def layers_of(shapes: dict[str, tuple]) -> Layers:
    """The vocabulary of a model with these parameters (name -> shape, in model order); see the module docstring."""
    names = list(shapes)
    if names and {"stem", "head"} <= {_top(n) for n in names} and all(_top(n) in UNET_LAYERS for n in names):
        of = {n: _top(n) for n in names}
        present = set(of.values())
        order = tuple(layer for layer in UNET_LAYERS if layer in present)
        groups = {g: tuple(layer for layer in members if layer in present) for g, members in UNET_GROUPS.items()}
        return Layers(of, order, groups, ("stem", "head"))
    of = {n: _module_key(n) for n in names}
    order = tuple(_down_mid_up(list(dict.fromkeys(of.values()))))
    mid = tuple(layer for layer in order if layer.startswith("mid_block"))
    if not mid and order:
        mid = (order[len(order) // 2],)
    at, end = (order.index(mid[0]), order.index(mid[-1])) if mid else (len(order), len(order))
    groups = {"encoder": order[:at], "mid": mid, "decoder": order[end + 1:]}
    matrices = [n for n in names if len(shapes[n]) >= 2] or names
    edges = (of[matrices[0]], of[matrices[-1]]) if matrices else ("", "")
    return Layers(of, order, groups, edges)
