"""Per-layer model report: type, output shape, kernel shape, parameters, MACs and receptive field.

Costs come from the formulas in `cnnlab.conv_math`, so the table is the arithmetic written down for a real model:

    >>> print(format_report(model_report(model)))          # one model, layer by layer
    >>> print(format_comparison({"standard": m1, "separable": m2}))   # several models, one row each

Nested models (an augmentation wrapper, a pretrained backbone) are expanded. The receptive field is that of one
output pixel of the layer, in pixels of the network's input, following the widest path through branches.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers

from cnnlab import conv_math


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: tuple
    kernel_shape: tuple | None
    params: int
    macs: int
    receptive_field: int


def _spatial(shape) -> tuple[int, int]:
    return int(shape[1]), int(shape[2])


def layer_macs(layer: layers.Layer, input_shape, output_shape) -> int:
    """Multiply-accumulates of one call of `layer` on one image."""
    if isinstance(layer, layers.DepthwiseConv2D):
        h, w = _spatial(output_shape)
        return conv_math.depthwise_macs(h, w, layer.kernel_size, int(input_shape[-1]), layer.depth_multiplier)
    if isinstance(layer, layers.SeparableConv2D):
        h, w = _spatial(output_shape)
        return conv_math.separable_macs(h, w, layer.kernel_size, int(input_shape[-1]), layer.filters,
                                        layer.depth_multiplier)
    if isinstance(layer, layers.Conv2D):
        h, w = _spatial(output_shape)
        return conv_math.conv2d_macs(h, w, layer.kernel_size, int(input_shape[-1]) // layer.groups, layer.filters)
    if isinstance(layer, layers.Dense):
        positions = 1
        for d in output_shape[1:-1]:
            positions *= int(d)
        return positions * conv_math.dense_macs(int(input_shape[-1]), layer.units)
    return 0


def _window(layer: layers.Layer) -> tuple[int, int, int] | None:
    """(kernel, stride, dilation) along the height axis for layers that slide a window, else None."""
    if isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D)):
        return layer.kernel_size[0], layer.strides[0], layer.dilation_rate[0]
    if isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
        return layer.pool_size[0], layer.strides[0], 1
    return None


def _kernel_shape(layer: layers.Layer) -> tuple | None:
    if isinstance(layer, layers.SeparableConv2D):
        return tuple(layer.depthwise_kernel.shape) + tuple(layer.pointwise_kernel.shape)
    for attr in ("kernel", "depthwise_kernel"):
        if hasattr(layer, attr) and getattr(layer, attr) is not None:
            try:
                return tuple(int(d) for d in getattr(layer, attr).shape)
            except (AttributeError, TypeError):
                continue
    return None


def _parents(layer: layers.Layer) -> list[layers.Layer]:
    if not layer._inbound_nodes:
        return []
    return [t._keras_history[0] for t in layer._inbound_nodes[0].input_tensors]


def _walk(model: keras.Model, rows: list[LayerRow], fields: dict, entry: tuple[int, int]) -> tuple[int, int]:
    """Appends the rows of `model`'s layers; `fields` maps layer id -> (receptive field, jump) of its output."""
    out = entry
    for layer in model.layers:
        parents = _parents(layer)
        if not parents or isinstance(layer, layers.InputLayer):
            fields[id(layer)] = entry
            continue
        field, jump = max(fields.get(id(p), entry) for p in parents)
        if isinstance(layer, keras.Model):
            out = _walk(layer, rows, fields, (field, jump))
            fields[id(layer)] = out
            continue
        window = _window(layer)
        if window:
            field, jump = conv_math.grow_receptive_field(field, jump, *window)
        fields[id(layer)] = out = (field, jump)
        in_shape = layer._inbound_nodes[0].input_tensors[0].shape
        out_shape = layer._inbound_nodes[0].output_tensors[0].shape
        rows.append(LayerRow(
            name=layer.name, type=type(layer).__name__, output_shape=tuple(out_shape[1:]),
            kernel_shape=_kernel_shape(layer), params=layer.count_params() if layer.built else 0,
            macs=layer_macs(layer, in_shape, out_shape), receptive_field=field,
        ))
    return out


def model_report(model: keras.Model) -> list[LayerRow]:
    """One row per layer (nested models expanded, input layers left out)."""
    rows: list[LayerRow] = []
    _walk(model, rows, {}, (1, 1))
    return rows


def totals(rows: list[LayerRow]) -> dict:
    return {"params": sum(r.params for r in rows), "macs": sum(r.macs for r in rows),
            "receptive_field": max((r.receptive_field for r in rows), default=1)}


def human(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_report(rows: list[LayerRow], skip_free: bool = True) -> str:
    """The per-layer table; layers with neither parameters nor MACs (activations, adds) are left out by default."""
    header = f"{'layer':<28} {'type':<22} {'output':<16} {'kernel':<18} {'params':>10} {'MACs':>10} {'RF':>5}"
    lines = [header, "-" * len(header)]
    for r in rows:
        if skip_free and not r.params and not r.macs and r.type not in ("MaxPooling2D", "AveragePooling2D"):
            continue
        kernel = "x".join(str(d) for d in r.kernel_shape) if r.kernel_shape else ""
        out = "x".join(str(d) for d in r.output_shape)
        lines.append(f"{r.name[:28]:<28} {r.type[:22]:<22} {out:<16} {kernel[:18]:<18} {r.params:>10,} "
                     f"{human(r.macs):>10} {r.receptive_field:>5}")
    t = totals(rows)
    lines.append("-" * len(header))
    lines.append(f"{'total':<86} {t['params']:>10,} {human(t['macs']):>10} {t['receptive_field']:>5}")
    return "\n".join(lines)


def format_comparison(models: dict[str, keras.Model], extra: dict[str, dict] | None = None) -> str:
    """One row per model: parameters, MACs per image, and each relative to the first model.

    Args:
        models: name -> model, the first being the reference for the ratio columns.
        extra: name -> {column: value} for measured columns (img/s, accuracy) where known.
    """
    extra = extra or {}
    columns = sorted({c for values in extra.values() for c in values})
    stats = {name: totals(model_report(m)) for name, m in models.items()}
    ref = next(iter(stats.values()))
    header = f"{'model':<24} {'params':>12} {'MACs/image':>12} {'params vs 1st':>14} {'MACs vs 1st':>12}"
    header += "".join(f" {c:>12}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, s in stats.items():
        line = (f"{name[:24]:<24} {s['params']:>12,} {human(s['macs']):>12} {s['params'] / ref['params']:>14.3f} "
                f"{s['macs'] / ref['macs']:>12.3f}")
        for c in columns:
            value = extra.get(name, {}).get(c)
            line += f" {value:>12.4g}" if isinstance(value, (int, float)) else f" {'':>12}"
        lines.append(line)
    return "\n".join(lines)


def compare_configs(config_files: list[str], overrides: list[str], num_classes: int = 2,
                    per_layer: bool = False) -> str:
    """The comparison table of several configs (one model each), optionally preceded by per-layer tables."""
    from pathlib import Path

    from cnnlab.config import resolve
    from cnnlab.modeling import build_model, family_network, without_pretrained_weights

    models, sizes, parts = {}, set(), []
    for path in config_files:
        cfg = without_pretrained_weights(resolve([path], overrides))
        model = family_network(build_model(cfg, num_classes))
        models[Path(path).stem] = model
        sizes.add(tuple(model.input_shape[1:3]))
        if per_layer:
            parts.append(f"== {path}: {model.name}, input {model.input_shape[1:]}\n"
                         f"{format_report(model_report(model))}\n")
    size_text = ", ".join("x".join(map(str, s)) for s in sorted(sizes))
    parts.append(f"Input {size_text}; MACs are multiply-accumulates for one image (FLOPs are about twice that).")
    parts.append(format_comparison(models))
    return "\n".join(parts)
