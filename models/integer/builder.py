"""Building an integer program from a calibrated QVit: the pieces every architecture shares.

:class:`Builder` appends :class:`~models.integer.program.Node` s and knows, for every value, its bounds
and grid. A quantization point of the fake-quant model becomes stored codes (:class:`Codes`: unsigned,
``code - qmin``, so a zero point is an unsigned number too) and every float step between two points
becomes integer arithmetic whose constants are computed here in float64 from the calibrated scales:

* a Linear or the patch embedding: the int8 weight codes (the fake-quant weight divided by its scale)
  into an int32 accumulator; its real scale and bias travel with it (:class:`Branch`) into the
  requantization that follows, which adds the bias exactly;
* everything between an accumulator and the next point - rescaling, the attention scale folded into
  q, LayerScale, a residual addition, Swin's relative position bias, pooling - one ``requant`` node
  whose real target is ``sum_i a_i (x_i - z_i) + b`` over the next point's step (:mod:`models.integer.dyadic`);
* a LayerNorm: :class:`~models.integer.layernorm.IntLayerNorm` from the PTF grid of its input to the
  grid of what reads it;
* the attention: q.k, the integer softmax the fake-quant model runs (its ``integer_softmax()``),
  attention x V (with log2 codes, on the integer weights ``2^(top - code)``; with PTQ4ViT's twin
  grid, on its fine step);
* the MLP: fc1, the GELU table's index (:mod:`models.integer.gelu`), the table giving fc2's codes
  (on a twin grid, its two regions as two tables and two GEMMs), fc2.

What cannot be integer is refused with :class:`IntegerUnsupported`, naming the point or the feature.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.integer import IntegerUnsupported
from models.integer.dyadic import INT64_BOUND, fixed_point
from models.integer.program import Grid, Node, Program, Value
from models.quant_vit import QVit, point_name
from models.ptq.tensor_quantizer import TensorQuantizer

__all__ = ["Builder", "Codes"]

INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Codes:
    """How one grid's codes are stored, ``0 .. hi``: ``value = (stored - zero) * scale`` (``uniform``),
    ``scale * 2^-stored`` with ``hi`` meaning 0 (``log2``), or a twin grid (``twin_signed``,
    ``twin_unsigned``: :class:`~models.integer.program.Grid`). ``scale`` and ``zero`` are per channel
    (the last axis) or scalars."""

    point: str | None
    kind: str
    scale: np.ndarray
    zero: np.ndarray
    hi: int
    fine: np.ndarray | None = None  # a twin grid's fine step

    @property
    def dtype(self) -> str:
        return "int32" if self.kind == "fixed" else "uint8" if self.hi <= 255 else "uint16"

    @property
    def range(self) -> tuple[int, int]:
        """The stored codes' bounds (a fixed grid is signed)."""
        return (-self.hi, self.hi) if self.kind == "fixed" else (0, self.hi)

    @property
    def grid(self) -> Grid:
        return Grid(self.kind, self.scale, self.zero, self.fine)

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
        if bt.qmax - bt.qmin > 65535:
            raise IntegerUnsupported(f"{name}: {bt.bits}-bit codes do not fit 16 bits")
        if method.log_domain:
            if not (method.power_of_two_scale and method.step == 1.0) or scale.ndim:
                raise IntegerUnsupported(f"{name}: a {q.spec.quantizer} grid has no integer form here (log2 with one power-of-two scale has)")
            return cls(name, "log2", scale, np.asarray(method.max_code(bt) + 1), method.max_code(bt) + 1)
        if method.twin_regions and not scale.ndim:
            fine = np.asarray(float(method.fine_step(float(scale), q.zero_point_value)))
            top = method.region_top(bt)
            if bt.symmetric:  # the sign picks the region: stored = code + 2^(b-1)
                return cls(name, "twin_signed", scale, np.asarray(-bt.qmin), bt.qmax - bt.qmin, fine)
            return cls(name, "twin_unsigned", scale, np.asarray(top + 1), 2 * top + 1, fine)
        if not method.uniform_levels:
            raise IntegerUnsupported(f"{name}: the {q.spec.quantizer} grid has no integer form here")
        zero = np.rint(q.zero_point.detach().double().cpu().numpy()).astype(np.int64) - bt.qmin
        return cls(name, "uniform", scale, zero, bt.qmax - bt.qmin)

    @classmethod
    def fixed(cls, scale: float) -> "Codes":
        """A signed fixed-point grid ``value = stored * scale`` (int32; its users give the range)."""
        return cls(None, "fixed", np.asarray(scale, np.float64), np.asarray(0), 0)


@dataclass
class Branch:
    """What a GEMM (or two, on a twin grid's two regions) gives before its requantization: int32
    accumulators, each with its per-channel real scale, and a real bias: ``sum_i acc_i * scale_i + bias``."""

    terms: list[tuple[str, np.ndarray]]
    bias: np.ndarray

    def onto(self, step: np.ndarray | float, factor: np.ndarray | float = 1.0) -> tuple[list[tuple[str, np.ndarray]], np.ndarray]:
        """The requant terms and offset of ``factor * branch / step`` (a LayerScale, the attention scale)."""
        return [(acc, scale * factor / step) for acc, scale in self.terms], self.bias * factor / step

    def map(self, fn) -> "Branch":
        """The same branch with ``fn`` applied to each accumulator name and each per-channel array (a layout change)."""
        return Branch([(fn(acc), fn(scale)) for acc, scale in self.terms], fn(self.bias))


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
        return self.value(name, codes.dtype, *codes.range, codes.grid, codes.point)

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

    def lookup(self, name: str, index: str, table: np.ndarray, codes: Codes, point: bool = True) -> str:
        """``table[index]``: a value on ``codes``'s grid (its point's, unless ``point`` is False)."""
        out = self.coded(name, codes)
        if not point:
            out.point = None
        return self.emit(name, "lookup", [index], [out], consts={"table": table})[0]

    # -- arithmetic ------------------------------------------------------------------------------------
    def patches(self, image: str, conv: nn.Module) -> str:
        """The float image onto the patch embedding's input grid (uniform, per tensor, 8-bit), cut into
        patches: with kernel = stride and no padding its Conv is a GEMM of the patches."""
        if tuple(conv.kernel_size) != tuple(conv.stride) or any(conv.padding) or conv.groups != 1:
            raise IntegerUnsupported("patch_embed.proj: the integer program's patch embedding needs kernel = stride, no padding")
        codes = self.codes(conv.input_quant)
        if codes.per_channel or codes.kind != "uniform" or codes.hi > 255:
            raise IntegerUnsupported(f"{codes.point}: the image's quantization must be uniform, per tensor, 8-bit")
        consts = {"scale": np.asarray(codes.scale, np.float32), "zero": np.asarray(codes.zero, np.int64)}
        name = "patch_embed.proj.input"
        x = self.emit(name, "quantize", [image], [self.coded(name, codes)], {"lo": 0, "hi": codes.hi}, consts)[0]
        patch = self.value("patch_embed.patches", "uint8", 0, codes.hi, codes.grid)
        return self.emit(patch.name, "im2col", [x], [patch], {"kernel": list(conv.kernel_size)})[0]

    def _gemm(self, name: str, x: str, module: nn.Module, x_zero: int, x_reach: int) -> tuple[str, np.ndarray]:
        """``sum_k (x_k - x_zero) W_kn``: int32 accumulator and the weight's per-channel scale."""
        wq = module.weight_quant
        wc = self.codes(wq)
        w = module.weight.detach()
        wcodes = torch.round(wq.fake_quant(w).double() / wq.broadcast(wq.scale, w).double()).reshape(w.shape[0], -1).cpu().numpy()
        qmin = wq.spec.bit_type.qmin
        if wcodes.min() < -128 or wcodes.max() > 127 or qmin < -128 or np.any(np.asarray(wc.zero) != -qmin):
            raise IntegerUnsupported(f"{wc.point}: weights must be symmetric codes of at most 8 bits")
        reach = int((np.abs(wcodes).sum(axis=1) * x_reach).max())
        if reach > INT32_MAX:
            raise IntegerUnsupported(f"{name}: its accumulator can exceed int32")
        out = self.value(name, "int32", -reach, reach)
        return self.emit(name, "linear", [x], [out], {"x_zero": x_zero}, {"weight": wcodes.T.astype(np.int8)})[0], wc.scale

    def linear(self, name: str, x: str, module: nn.Module) -> Branch:
        """``module``'s GEMM (a QuantLinear, or a QuantConv2d flattened to [out, K]) on the codes ``x`` of
        its input point: 8-bit uniform, or PTQ4ViT's signed twin grid (post-GELU), whose two regions are
        two 8-bit GEMMs - the positive codes (``0 .. 127``) on the coarse step, the negative ones (stored
        ``+ 128``, zero point 128) on the fine step. The bias stays real, for the requantization after it
        to add exactly (an int32 bias on the accumulator's grid would be off by up to half a step of it)."""
        xc = self.codes(module.input_quant)
        if xc.per_channel or xc.kind not in ("uniform", "twin_signed") or self.values[x].dtype != "uint8":
            raise IntegerUnsupported(f"{xc.point}: a GEMM input needs 8-bit codes on one uniform or twin grid per tensor")
        bias = module.quant_bias()
        bias = None if bias is None else bias.detach().double().cpu().numpy()
        if xc.kind == "uniform":
            x_zero = int(xc.zero)
            acc, w_scale = self._gemm(name, x, module, x_zero, max(x_zero, xc.hi - x_zero))
            terms = [(acc, float(xc.scale) * w_scale)]
        else:
            zero = int(xc.zero)
            codes = np.arange(xc.hi + 1) - zero
            positive = self.lookup(f"{name}.input.positive", x, np.maximum(codes, 0).astype(np.uint8),
                                   Codes(None, "uniform", xc.scale, np.asarray(0), 255), point=False)  # fmt: skip
            negative = self.lookup(f"{name}.input.negative", x, (np.minimum(codes, 0) + zero).astype(np.uint8),
                                   Codes(None, "uniform", xc.fine, np.asarray(zero), 255), point=False)  # fmt: skip
            acc_p, w_scale = self._gemm(f"{name}.positive", positive, module, 0, xc.hi - zero)
            acc_n, _ = self._gemm(f"{name}.negative", negative, module, zero, zero)
            terms = [(acc_p, float(xc.scale) * w_scale), (acc_n, float(xc.fine) * w_scale)]
        for acc, scale in terms:
            self.values[acc].grid = Grid("uniform", scale, np.zeros(()))
        return Branch(terms, np.zeros(len(terms[0][1])) if bias is None else bias)

    def requant(self, name: str, terms: list[tuple[str, np.ndarray]], offset: np.ndarray | float, out: Codes, lo: int | None = None,
                hi: int | None = None, layout: bool = True, dtype: str | None = None) -> str:  # fmt: skip
        """``clamp(round_half_up(sum_i a_i (x_i - z_i) + b) ...)`` onto ``out``: each term is an input and its
        real multiplier ``a_i / s_out`` (broadcast to the output), ``offset`` is ``b / s_out`` (the output's
        zero point is added here); ``lo`` / ``hi`` default to ``out``'s stored range. ``layout``: the
        output is ``out``'s point in its layout (False: a layout change still follows). ``dtype``
        overrides ``out``'s storage type (int32 table indices)."""
        if out.kind not in ("uniform", "fixed"):
            raise IntegerUnsupported(f"{out.point}: a {out.kind} grid is written by a table or the softmax, not by rescaling")
        if lo is None:
            lo, hi = out.range
        r = np.asarray(offset, np.float64) + np.asarray(out.zero, np.float64)
        bounds = []
        for x, m in terms:
            v = self.values[x]
            if v.grid is not None and v.grid.kind not in ("uniform", "fixed"):
                raise IntegerUnsupported(f"{v.point or x}: a {v.grid.kind} grid is not rescaled term by term")
            z = np.asarray(v.grid.zero, np.float64) if v.grid is not None else 0.0
            r = r - np.asarray(m, np.float64) * z
            bounds.append(float(np.max(np.abs(m))) * _bound(v))
        total = sum(bounds) + float(np.max(np.abs(r))) + 1.0
        sh = max(0, min(48, math.floor(math.log2(INT64_BOUND / total)) - 1))
        consts = {f"m{i}": fixed_point(m, sh) for i, (_, m) in enumerate(terms)}
        consts["r"] = fixed_point(r + 0.5, sh)
        dtype = dtype or out.dtype
        value = self.value(name, dtype, lo, hi, out.grid, out.point if layout else None)
        return self.emit(name, "requant", [x for x, _ in terms], [value], {"shift": sh, "lo": lo, "hi": hi}, consts)[0]

    def layernorm(self, name: str, x: str, module: nn.Module, out: Codes, lo: int | None = None, hi: int | None = None,
                  layout: bool = True) -> str:  # fmt: skip
        """The integer LayerNorm of ``module`` (a QuantLayerNorm) from its input point's codes ``x`` onto
        ``out`` (the constants the fake-quant model's own integer LayerNorm uses, where it has one);
        ``layout`` as :meth:`requant`'s."""
        xc = self.codes(module.input_quant)
        if out.kind not in ("uniform", "fixed"):
            raise IntegerUnsupported(f"{out.point}: a LayerNorm writes a uniform grid, not a {out.kind} one")
        if lo is None:
            lo, hi = out.range
        ln = module.integer_layernorm(out.scale, out.zero, lo, hi)
        if ln is None:
            raise IntegerUnsupported(f"{xc.point}: a LayerNorm input needs one scale or power-of-two multiples of one step per channel (PTF)")
        x_max = int(np.max(np.maximum(ln.zero, xc.hi - ln.zero) << ln.shift))
        if 2 * ln.channels * x_max >= 2**31:  # X, its sum S and C X - S are int32 in the ONNX form
            raise IntegerUnsupported(f"{xc.point}: the integer LayerNorm's sums over {ln.channels} channels of these codes could leave int32")
        value = self.value(name, out.dtype, lo, hi, out.grid, out.point if layout else None)
        return self.emit(name, "layernorm", [x], [value], {"layernorm": ln})[0]

    def logits(self, heads: list[Branch]) -> str:
        """The mean of the heads' branches as int32 logits on one power-of-two step, the finest whose
        largest possible value stays below 2^30, then float: the program's output."""
        weight = 1.0 / len(heads)
        reach = sum(_bound(self.values[a]) * float(np.max(s)) * weight for h in heads for a, s in h.terms)
        reach += sum(float(np.abs(h.bias).max()) * weight for h in heads)
        step = 2.0 ** (math.ceil(math.log2(max(reach, 1e-30))) - 30)
        terms, offset = [], 0.0
        for h in heads:
            t, o = h.onto(step, weight)
            terms += t
            offset = offset + o
        logits = self.requant("logits", terms, offset, Codes.fixed(step), -INT32_MAX, INT32_MAX)
        out = self.value("logits.float", "float32", -math.inf, math.inf)
        return self.emit(out.name, "dequantize", [logits], [out], consts={"scale": np.asarray(step, np.float32)})[0]

    # -- attention -------------------------------------------------------------------------------------
    def attention(self, prefix: str, x: str, attn: nn.Module, heads: int, tokens: int, bias: np.ndarray | None = None,
                  mask: np.ndarray | None = None) -> Branch:  # fmt: skip
        """Multi-head self-attention on the codes ``x`` ``[B', N, C]`` (attn.qkv's input point) up to
        proj's :class:`Branch` ``[B', N, C]``. ``bias`` is added to the scores before their quantization
        (Swin's relative position bias, ``[heads, N, N]``), ``mask`` after it (Swin's shift mask,
        ``[windows, N, N]``, 0 or -100)."""
        qkv_branch = self.linear(f"{prefix}.qkv", x, attn.qkv)
        dim = len(qkv_branch.bias) // 3
        head_dim = dim // heads
        operands = [self.codes(a.input_quant) for a in (attn.q_act, attn.k_act, attn.v_act)]
        for codes in operands:
            if codes.per_channel or codes.kind != "uniform":
                raise IntegerUnsupported(f"{codes.point}: an attention operand needs one uniform scale per tensor")
        qc, kc, vc = operands
        # q is quantized times the attention scale (QuantAttention): fold it into q's multipliers.
        factor = np.repeat([float(attn.scale), 1.0, 1.0], dim)
        scale = np.repeat([float(c.scale) for c in operands], dim)
        zero = np.repeat([int(c.zero) for c in operands], dim)
        terms, offset = qkv_branch.onto(scale, factor)
        qkv = self.requant(f"{prefix}.qkv.output", terms, offset, Codes(None, "uniform", scale, zero, 255))
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
        attrs, consts = {"softmax": program, "tokens": tokens}, {}
        if mask is not None:
            attrs["heads"] = heads
            consts["mask"] = np.rint(mask / float(sc.scale)).astype(np.int64)
        probs = self.emit(f"{prefix}.softmax", "softmax", [scores], [self.coded(f"{prefix}.softmax.output", ac)], attrs, consts)[0]
        probs = self._attention_weights(f"{prefix}.softmax.weights", probs, ac)
        a_scale = float(self.values[probs].grid.scale)
        ctx_acc = self.matmul(f"{prefix}.attn_v", probs, v, tokens, a_scale * float(vc.scale))
        pc = self.codes(attn.proj.input_quant)
        ctx = self.requant(f"{prefix}.proj.input.heads", [(ctx_acc, np.asarray(a_scale * float(vc.scale) / float(pc.scale)))], 0.0, pc, layout=False)
        ctx = self.transpose(f"{prefix}.proj.input.t", ctx, [0, 2, 1, 3], grid_kept=True)
        ctx = self.reshape(f"{prefix}.proj.input", ctx, [0, 0, dim], point=pc.point)
        return self.linear(f"{prefix}.proj", ctx, attn.proj)

    def _attention_weights(self, name: str, probs: str, ac: Codes) -> str:
        """The attention map's codes as integer weights on one step, where they are not already: log2
        codes as ``2^(top - code)`` (attention x V by shifts), twin codes on the fine step."""
        if ac.kind == "uniform":
            return probs
        if ac.kind == "log2":
            top = ac.hi - 1
            weights = self.value(name, "int32", 0, 2**top, Grid("uniform", np.asarray(float(ac.scale) * 2.0**-top), np.zeros(())))
            return self.emit(name, "decode", [probs], [weights], {"kind": "log2", "top": top, "hi": ac.hi})[0]
        shift = round(math.log2(float(ac.scale) / float(ac.fine)))  # twin: coarse = fine * 2^shift
        top = int(ac.zero) - 1
        weights = self.value(name, "int32", 0, top << shift, Grid("uniform", np.asarray(float(ac.fine)), np.zeros(())))
        return self.emit(name, "decode", [probs], [weights], {"kind": "twin", "top": top, "shift": shift})[0]

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
    def mlp(self, prefix: str, x: str, mlp: nn.Module) -> Branch:
        """fc1, GELU, fc2 from fc1's input codes ``x``: fc2's :class:`Branch`. GELU is a table
        (:mod:`models.integer.gelu`) indexed by fc1's output on the grid its fake-quant model rounds to,
        whose entries are fc2's input codes (on a twin grid: two tables, one per region)."""
        fc1 = self.linear(f"{prefix}.fc1", x, mlp.fc1)
        act = mlp.act
        if not getattr(act, "integer", False):
            raise IntegerUnsupported(f"{prefix}.act computes GELU in float (the recipe's integer_gelu is off)")
        if act.channel_scale is not None:
            raise IntegerUnsupported(f"{prefix}.act divides GELU channel by channel (reparam mlp_alpha): one table per channel is not lowered")
        q = mlp.fc2.input_quant
        fc2c = self.codes(q)
        table = act.table()
        if table is None:
            raise IntegerUnsupported(f"{fc2c.point}: GELU's table needs fc2's input on one grid (per tensor)")
        # The grid's real values are lo + i * step: zero point -lo / step.
        grid = Codes(None, "uniform", np.asarray(table.step), np.asarray(-table.lo / table.step), table.size - 1)
        terms, offset = fc1.onto(table.step)
        index = self.requant(f"{prefix}.act.input", terms, offset, grid, dtype="int32")
        fq = q.fake_quant(table.values(torch.arange(table.size)))  # fc2's own rounding of GELU(x_i), in float64
        if fc2c.kind == "twin_signed":
            stored = torch.where(fq >= 0, fq / float(fc2c.scale), fq / float(fc2c.fine)).round() + int(fc2c.zero)
        else:
            stored = torch.round(fq / q.scale_value) + q.zero_point_value - q.spec.bit_type.qmin
        h = self.lookup(f"{prefix}.fc2.input", index, stored.numpy().astype(np.uint8 if fc2c.hi <= 255 else np.uint16), fc2c)
        return self.linear(f"{prefix}.fc2", h, mlp.fc2)
