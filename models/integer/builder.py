"""Building an integer program from a calibrated QVit: the pieces every architecture shares.

:class:`Builder` appends :class:`~models.integer.program.Node` s and knows, for every value, its bounds
and grid. A quantization point of the fake-quant model becomes stored codes (:class:`Codes`: unsigned,
``code - qmin``, so a zero point is an unsigned number too) and every float step between two points
becomes integer arithmetic whose constants are computed here in float64 from the calibrated scales:

* a Linear or the patch embedding: the int8 weight codes (the fake-quant weight divided by its scale)
  and an int32 bias on the accumulator's grid ``s_x * s_w`` (off by at most half an accumulator step);
* everything between an accumulator and the next point - rescaling, the attention scale folded into
  q, LayerScale, a residual addition, Swin's relative position bias, pooling - one ``requant`` node
  whose real target is ``sum_i a_i (x_i - z_i) + b`` over the next point's step (:mod:`models.integer.dyadic`);
* a LayerNorm: :class:`~models.integer.layernorm.IntLayerNorm` from the PTF grid of its input to the
  grid of what reads it;
* the attention: q.k, the integer softmax the fake-quant model runs (its ``integer_softmax()``),
  attention x V (with log2 codes, on the integer weights ``2^(top - code)``);
* the MLP: fc1, the GELU table's index (:mod:`models.integer.gelu`), the table giving fc2's codes, fc2.

What cannot be integer is refused with :class:`IntegerUnsupported`, naming the point or the feature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.integer.dyadic import INT64_BOUND, fixed_point
from models.integer.program import INT_RANGES, Grid, Node, Program, Value
from models.quant_vit import QVit, point_name
from models.ptq.tensor_quantizer import TensorQuantizer

__all__ = ["Builder", "Codes", "IntegerUnsupported"]

INT32_MAX = 2**31 - 1


class IntegerUnsupported(ValueError):
    """The calibrated model has a point or a feature the integer program cannot express (one line)."""


@dataclass(frozen=True)
class Codes:
    """How one grid's codes are stored: ``value = (stored - zero) * scale`` (``uniform``) or ``scale *
    2^-stored``, ``hi`` meaning 0 (``log2``); stored codes are ``0 .. hi``. ``scale`` and ``zero`` are
    per channel (the last axis) or scalars."""

    point: str | None
    kind: str
    scale: np.ndarray
    zero: np.ndarray
    hi: int

    @property
    def dtype(self) -> str:
        return "uint8" if self.hi <= 255 else "uint16"

    @property
    def grid(self) -> Grid:
        return Grid(self.kind, self.scale, self.zero)

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0

    @classmethod
    def of(cls, q: TensorQuantizer, path: str) -> "Codes":
        """The stored codes of a calibrated quantizer; :class:`IntegerUnsupported` if it has none."""
        name = point_name(path)
        if q.spec is None or not q.enabled:
            raise IntegerUnsupported(f"{name} stays float; the integer program quantizes every point")
        if not q.is_calibrated:
            raise IntegerUnsupported(f"{name} is not calibrated")
        if not q.static_grid:
            raise IntegerUnsupported(f"{name} has a dynamic per-token scale, which the integer program does not compute yet")
        bt, method = q.spec.bit_type, q.method
        scale = q.scale.detach().double().cpu().numpy()
        if method.log_domain:
            if not (method.power_of_two_scale and method.step == 1.0) or scale.ndim:
                raise IntegerUnsupported(f"{name}: a {q.spec.quantizer} grid has no integer form here (log2 with one power-of-two scale has)")
            return cls(name, "log2", scale, np.asarray(method.max_code(bt) + 1), method.max_code(bt) + 1)
        if not method.learnable_scale:  # not a plain uniform grid
            raise IntegerUnsupported(f"{name}: the {q.spec.quantizer} grid has no integer form here")
        if bt.qmax - bt.qmin > 65535:
            raise IntegerUnsupported(f"{name}: {bt.bits}-bit codes do not fit 16 bits")
        zero = np.rint(q.zero_point.detach().double().cpu().numpy()).astype(np.int64) - bt.qmin
        return cls(name, "uniform", scale, zero, bt.qmax - bt.qmin)

    @classmethod
    def fixed(cls, scale: float, lo: int, hi: int) -> "Codes":
        """A signed fixed-point grid ``value = stored * scale`` (stored in ``[lo, hi]``, int32)."""
        return cls(None, "fixed", np.asarray(scale, np.float64), np.asarray(0), hi)


def _bound(value: Value) -> int:
    return int(max(abs(value.lo), abs(value.hi)))


class Builder:
    """Appends nodes and values; each method emits one step of the program and returns its output's name."""

    def __init__(self, qvit: QVit) -> None:
        self.qvit = qvit
        self.nodes: list[Node] = []
        self.values: dict[str, Value] = {}
        self.stages: list[tuple[str, int]] = []
        self.paths = {id(m): name for name, m in qvit.model.named_modules()}

    # -- bookkeeping -----------------------------------------------------------------------------------
    def path(self, module: nn.Module) -> str:
        return self.paths[id(module)]

    def codes(self, q: TensorQuantizer) -> Codes:
        return Codes.of(q, self.path(q))

    def stage(self, name: str) -> None:
        self.stages.append((name, len(self.nodes)))

    def value(self, name: str, dtype: str, lo: float, hi: float, grid: Grid | None = None, point: str | None = None) -> Value:
        unique, k = name, 1
        while unique in self.values:
            k += 1
            unique = f"{name}:{k}"
        v = Value(unique, dtype, lo, hi, grid, point)
        self.values[unique] = v
        return v

    def coded(self, name: str, codes: Codes) -> Value:
        lo, hi = (0, codes.hi) if codes.kind != "fixed" else (-codes.hi, codes.hi)
        return self.value(name, codes.dtype if codes.kind != "fixed" else "int32", lo, hi, codes.grid, codes.point)

    def emit(self, name: str, op: str, inputs: list[str], outputs: list[Value], attrs: dict | None = None, consts: dict | None = None) -> list[str]:
        self.nodes.append(Node(name, op, list(inputs), [v.name for v in outputs], attrs or {}, consts or {}))
        return [v.name for v in outputs]

    def program(self, input_name: str, output_name: str, meta: dict) -> Program:
        return Program(self.nodes, self.values, input_name, output_name, self.stages, meta)

    # -- data movement ---------------------------------------------------------------------------------
    def _like(self, name: str, source: str, grid_kept: bool = True, point: str | None = None) -> Value:
        """A value with ``source``'s type and bounds (and grid); it realizes a fake-quant point only where
        its elements are that point's tensor in its layout: ``point`` names it."""
        v = self.values[source]
        return self.value(name, v.dtype, v.lo, v.hi, v.grid if grid_kept else None, point)

    def reshape(self, name: str, x: str, shape: list[int], grid_kept: bool = True, point: str | None = None) -> str:
        """A reshape keeps the elements' order: it keeps ``x``'s point unless told another."""
        point = point or (self.values[x].point if grid_kept else None)
        return self.emit(name, "reshape", [x], [self._like(name, x, grid_kept, point)], {"shape": list(shape)})[0]

    def transpose(self, name: str, x: str, perm: list[int], grid_kept: bool = False) -> str:
        return self.emit(name, "transpose", [x], [self._like(name, x, grid_kept)], {"perm": list(perm)})[0]

    def roll(self, name: str, x: str, shifts: list[int], dims: list[int], sizes: list[int]) -> str:
        """``torch.roll`` along ``dims`` (of ``sizes`` elements: the ONNX form cuts and joins there)."""
        return self.emit(name, "roll", [x], [self._like(name, x)], {"shifts": list(shifts), "dims": list(dims), "sizes": list(sizes)})[0]

    def slice(self, name: str, x: str, axis: int, start: int, end: int) -> str:
        return self.emit(name, "slice", [x], [self._like(name, x)], {"axis": axis, "start": start, "end": end})[0]

    # -- arithmetic ------------------------------------------------------------------------------------
    def quantize(self, name: str, x: str, codes: Codes) -> str:
        """The float image onto its input point's grid (per tensor)."""
        if codes.per_channel:
            raise IntegerUnsupported(f"{codes.point}: the image's quantization must be per tensor")
        consts = {"scale": np.asarray(codes.scale, np.float32), "zero": np.asarray(codes.zero, np.int64)}
        return self.emit(name, "quantize", [x], [self.coded(name, codes)], {"lo": 0, "hi": codes.hi}, consts)[0]

    def linear(self, name: str, x: str, module: nn.Module) -> tuple[str, np.ndarray, np.ndarray]:
        """``module``'s GEMM (a QuantLinear, or a QuantConv2d flattened to [out, K]) on the codes ``x``:
        the int32 accumulator, its per-channel scale, and the bias in accumulator steps (float64), which
        the requantization after it adds exactly (an int32 bias on the accumulator's grid would be off by
        up to half a step of it)."""
        xq, wq = module.input_quant, module.weight_quant
        xc, wc = self.codes(xq), self.codes(wq)
        if xc.per_channel:
            raise IntegerUnsupported(f"{xc.point}: per-channel input scales of a GEMM have no integer form (one scale per tensor)")
        if self.values[x].dtype != "uint8":
            raise IntegerUnsupported(f"{xc.point}: a GEMM input of more than 8 bits")
        w = module.weight.detach()
        wcodes = torch.round(wq.fake_quant(w).double() / wq.broadcast(wq.scale, w).double()).reshape(w.shape[0], -1).cpu().numpy()
        qmin = wq.spec.bit_type.qmin
        if wcodes.min() < -128 or wcodes.max() > 127 or qmin < -128 or np.any(np.asarray(wc.zero) != -qmin):
            raise IntegerUnsupported(f"{wc.point}: weights must be symmetric codes of at most 8 bits")
        acc_scale = float(xc.scale) * wc.scale  # (out,)
        bias = module.quant_bias()
        bias = np.zeros(len(acc_scale)) if bias is None else bias.detach().double().cpu().numpy() / acc_scale
        x_zero = int(xc.zero)
        reach = int((np.abs(wcodes).sum(axis=1) * max(x_zero, xc.hi - x_zero)).max())
        if reach > INT32_MAX:
            raise IntegerUnsupported(f"{name}: its accumulator can exceed int32")
        out = self.value(name, "int32", -reach, reach, Grid("uniform", acc_scale, np.zeros(())))
        acc = self.emit(name, "linear", [x], [out], {"x_zero": x_zero}, {"weight": wcodes.T.astype(np.int8)})[0]
        return acc, acc_scale, bias

    def requant(self, name: str, terms: list[tuple[str, np.ndarray]], offset: np.ndarray | float, out: Codes, lo: int | None = None,
                hi: int | None = None, layout: bool = True, dtype: str | None = None) -> str:  # fmt: skip
        """``clamp(round_half_up(sum_i a_i (x_i - z_i) + b) ...)`` onto ``out``: each term is an input and its
        real multiplier ``a_i / s_out`` (broadcast to the output), ``offset`` is ``b / s_out`` (the output's
        zero point is added here); ``lo`` / ``hi`` default to ``out``'s stored range. ``layout``: the
        output is ``out``'s point in its layout (False: a layout change still follows). ``dtype``
        overrides ``out``'s storage type (int32 table indices)."""
        if lo is None:
            lo, hi = (0, out.hi) if out.kind != "fixed" else (-out.hi, out.hi)
        r = np.asarray(offset, np.float64) + (np.asarray(out.zero, np.float64) if out.kind != "fixed" else 0.0)
        bounds = []
        for x, m in terms:
            v = self.values[x]
            z = np.asarray(v.grid.zero, np.float64) if v.grid is not None and v.grid.kind == "uniform" else 0.0
            r = r - np.asarray(m, np.float64) * z
            bounds.append(float(np.max(np.abs(m))) * _bound(v))
        total = sum(bounds) + float(np.max(np.abs(r))) + 1.0
        sh = max(0, min(48, math.floor(math.log2(INT64_BOUND / total)) - 1))
        consts = {f"m{i}": fixed_point(m, sh) for i, (_, m) in enumerate(terms)}
        consts["r"] = fixed_point(r + 0.5, sh)
        dtype = dtype or (out.dtype if out.kind != "fixed" else "int32")
        value = self.value(name, dtype, lo, hi, out.grid, out.point if layout else None)
        return self.emit(name, "requant", [x for x, _ in terms], [value], {"shift": sh, "lo": lo, "hi": hi}, consts)[0]

    def layernorm(self, name: str, x: str, module: nn.Module, out: Codes, lo: int | None = None, hi: int | None = None,
                  layout: bool = True) -> str:  # fmt: skip
        """The integer LayerNorm of ``module`` (a QuantLayerNorm) from its input point's codes ``x`` onto
        ``out`` (the constants the fake-quant model's own integer LayerNorm uses, where it has one);
        ``layout`` as :meth:`requant`'s."""
        xc = self.codes(module.input_quant)
        if lo is None:
            lo, hi = (0, out.hi) if out.kind != "fixed" else (-out.hi, out.hi)
        ln = module.integer_layernorm(out.scale, out.zero if out.kind != "fixed" else np.zeros(()), lo, hi)
        if ln is None:
            raise IntegerUnsupported(f"{xc.point}: a LayerNorm input needs one scale or power-of-two multiples of one step per channel (PTF)")
        dtype = out.dtype if out.kind != "fixed" else "int32"
        value = self.value(name, dtype, lo, hi, out.grid, out.point if layout else None)
        return self.emit(name, "layernorm", [x], [value], {"layernorm": ln})[0]

    def logits(self, heads: list[tuple[str, np.ndarray, np.ndarray]]) -> str:
        """The mean of the heads' accumulators (each with its scale and bias) as int32 logits on one
        power-of-two step, whose largest possible value stays below 2^30, then float: the output."""
        weight = 1.0 / len(heads)
        finest = min(float(s.min()) for _, s, _ in heads)
        reach = sum((_bound(self.values[a]) + float(np.abs(bias).max())) * float(s.max()) * weight for a, s, bias in heads)
        step = 2.0 ** max(math.floor(math.log2(finest)), math.ceil(math.log2(max(reach, 1e-30))) - 30)
        limit = INT32_MAX
        terms = [(a, s * weight / step) for a, s, _ in heads]
        offset = sum(bias * s * weight / step for _, s, bias in heads)
        logits = self.requant("logits", terms, offset, Codes.fixed(step, 0, 0), -limit, limit)
        out = self.value("logits.float", "float32", -math.inf, math.inf)
        return self.emit(out.name, "dequantize", [logits], [out], consts={"scale": np.asarray(step, np.float32)})[0]

    # -- attention -------------------------------------------------------------------------------------
    def attention(self, prefix: str, x: str, attn: nn.Module, heads: int, tokens: int, bias: np.ndarray | None = None,
                  mask: np.ndarray | None = None) -> tuple[str, np.ndarray, np.ndarray]:  # fmt: skip
        """Multi-head self-attention on the codes ``x`` ``[B', N, C]`` (attn.qkv's input point) up to
        proj's int32 accumulator ``[B', N, C]``: returns it, its per-channel scale and proj's bias (as
        :meth:`linear`). ``bias`` is added
        to the scores before their quantization (Swin's relative position bias, ``[heads, N, N]``),
        ``mask`` after it (Swin's shift mask, ``[windows, N, N]``, 0 or -100)."""
        acc, acc_scale, qkv_bias = self.linear(f"{prefix}.qkv", x, attn.qkv)
        dim = acc_scale.shape[0] // 3
        head_dim = dim // heads
        operands = [self.codes(a.input_quant) for a in (attn.q_act, attn.k_act, attn.v_act)]
        for codes in operands:
            if codes.per_channel:
                raise IntegerUnsupported(f"{codes.point}: per-channel scales of an attention operand have no integer form")
        qc, kc, vc = operands
        # q is quantized times the attention scale (QuantAttention): fold it into q's multipliers.
        factor = np.repeat([float(attn.scale), 1.0, 1.0], dim)
        scale = np.repeat([float(c.scale) for c in operands], dim)
        zero = np.repeat([int(c.zero) for c in operands], dim)
        m = acc_scale * factor / scale
        qkv = self.requant(f"{prefix}.qkv.output", [(acc, m)], qkv_bias * m, Codes(None, "uniform", scale, zero, 255))
        split = self.reshape(f"{prefix}.qkv.heads", qkv, [0, 0, 3, heads, head_dim], grid_kept=False)
        split = self.transpose(f"{prefix}.qkv.permute", split, [2, 0, 3, 1, 4])
        parts = []
        for i, (part, codes) in enumerate(zip(("q", "k", "v"), operands)):
            piece = self.slice(f"{prefix}.{part}.slice", split, 0, i, i + 1)
            parts.append(self.emit(f"{prefix}.{part}", "reshape", [piece], [self.coded(f"{prefix}.{part}", codes)],
                                   {"shape": [-1, heads, tokens, head_dim]})[0])  # fmt: skip
        q, k, v = parts
        kt = self.transpose(f"{prefix}.k.t", k, [0, 1, 3, 2], grid_kept=True)
        softmax = attn.softmax
        sc = self.codes(softmax.input_quant)
        qk_scale = float(qc.scale) * float(kc.scale)
        scores_acc = self.matmul(f"{prefix}.qk", q, kt, head_dim, qk_scale)
        offset = 0.0 if bias is None else bias / float(sc.scale)
        scores = self.requant(f"{prefix}.softmax.input", [(scores_acc, np.asarray(qk_scale / float(sc.scale)))], offset, sc)
        program = softmax.integer_softmax()
        if program is None:
            raise IntegerUnsupported(f"{point_name(self.path(softmax.output_quant))}: this attention grid has no integer softmax here")
        ac = self.codes(softmax.output_quant)
        attrs, consts = {"softmax": program}, {}
        if mask is not None:
            attrs["heads"] = heads
            consts["mask"] = np.rint(mask / float(sc.scale)).astype(np.int64)
        probs = self.emit(f"{prefix}.softmax", "softmax", [scores], [self.coded(f"{prefix}.softmax.output", ac)], attrs, consts)[0]
        if ac.kind == "log2":  # attention x V as shifts: integer weights 2^(top - code)
            top = ac.hi - 1
            weights = self.value(f"{prefix}.softmax.weights", "int32", 0, 2**top, Grid("uniform", np.asarray(float(ac.scale) * 2.0**-top), np.zeros(())))
            probs = self.emit(weights.name, "decode", [probs], [weights], {"top": top, "hi": ac.hi})[0]
        a_scale = float(self.values[probs].grid.scale)
        ctx_acc = self.matmul(f"{prefix}.attn_v", probs, v, tokens, a_scale * float(vc.scale))
        pc = self.codes(attn.proj.input_quant)
        ctx = self.requant(f"{prefix}.proj.input.heads", [(ctx_acc, np.asarray(a_scale * float(vc.scale) / float(pc.scale)))], 0.0, pc, layout=False)
        ctx = self.transpose(f"{prefix}.proj.input.t", ctx, [0, 2, 1, 3], grid_kept=True)
        ctx = self.reshape(f"{prefix}.proj.input", ctx, [0, 0, dim], point=pc.point)
        return self.linear(f"{prefix}.proj", ctx, attn.proj)

    def matmul(self, name: str, a: str, b: str, inner: int, scale: float) -> str:
        """``(a - za) @ (b - zb)`` of two values on uniform grids (zero points from their grids) into int32."""
        va, vb = self.values[a], self.values[b]
        za, zb = int(va.grid.zero), int(vb.grid.zero)
        bound = inner * max(za, int(va.hi) - za) * max(zb, int(vb.hi) - zb)
        if bound > INT32_MAX:
            raise IntegerUnsupported(f"{name}: its accumulator can exceed int32")
        out = self.value(name, "int32", -bound, bound, Grid("uniform", np.asarray(scale), np.zeros(())))
        return self.emit(name, "matmul", [a, b], [out], {"a_zero": za, "b_zero": zb, "bound": bound})[0]

    # -- MLP -------------------------------------------------------------------------------------------
    def mlp(self, prefix: str, x: str, mlp: nn.Module) -> tuple[str, np.ndarray, np.ndarray]:
        """fc1, GELU, fc2 from fc1's input codes ``x``: fc2's int32 accumulator, scale and bias (as
        :meth:`linear`). GELU is a table (:mod:`models.integer.gelu`) indexed by fc1's output on the
        grid its fake-quant model rounds to, whose entries are fc2's input codes."""
        acc, acc_scale, bias = self.linear(f"{prefix}.fc1", x, mlp.fc1)
        act = mlp.act
        if not getattr(act, "integer", False):
            raise IntegerUnsupported(f"{prefix}.act computes GELU in float (the recipe's integer_gelu is off)")
        if act.channel_scale is not None:
            raise IntegerUnsupported(f"{prefix}.act divides GELU channel by channel (reparam mlp_alpha): one table per channel is not lowered")
        table = act.table()
        q = mlp.fc2.input_quant
        fc2c = self.codes(q)
        # The grid's real values are lo + i * step: zero point -lo / step.
        grid = Codes(None, "uniform", np.asarray(table.step), np.asarray(-table.lo / table.step), table.size - 1)
        m = acc_scale / table.step
        index = self.requant(f"{prefix}.act.input", [(acc, m)], bias * m, grid, dtype="int32")
        points = torch.arange(table.size)
        fq = q.fake_quant(table.values(points))  # fc2's own rounding of GELU(x_i), in float64
        stored = torch.round(fq / q.scale_value) + q.zero_point_value - q.spec.bit_type.qmin
        entries = stored.cpu().numpy().astype(np.uint8 if fc2c.hi <= 255 else np.uint16)
        y = self.coded(f"{prefix}.fc2.input", fc2c)
        h = self.emit(y.name, "lookup", [index], [y], consts={"table": entries})[0]
        return self.linear(f"{prefix}.fc2", h, mlp.fc2)
