"""The integer program as standard ONNX: ``int_only.onnx`` (FQ-ViT, arXiv 2111.13824, every operation in integers).

Each operation of a :class:`~models.integer.program.Program` becomes standard ONNX operators (no
``com.microsoft`` ones, so TVM and hardware compilers read it): ``MatMulInteger`` of two uint8 operands
for every GEMM of 8-bit codes (exact on every CPU), ``MatMul`` on int32 for attention x V on log2 codes' integer weights, ``GatherElements``
for tables, and elementwise ``Mul``/``Add``/``Div``/``Mod``/``BitShift``/``Clip``/``Max``/``Min``/``Where`` on
int32 and int64 tensors for the rest. Between the one ``QuantizeLinear`` of the float image and the
one ``DequantizeLinear`` of the int32 logits every tensor is an integer type (:func:`float_tensors`
checks it with ONNX shape inference).

Every emitter computes its operation's integers exactly (:mod:`models.integer.ops`), with the same
rounding, so ONNX Runtime and the PyTorch executor agree value by value (the tests check it). Floor
divisions by a power of two are unsigned ``BitShift``s of values first offset to be non-negative (a
requantization folds the offset into its ``R``), or ``Div``s of non-negative values (ONNX's integer
``Div`` truncates); the i-exp of 8-bit scores is a table of the program's own values. int64 holds what
the PyTorch executor holds in int64 (the requantizations' products, the LayerNorm's numerator, sums
of squares and ``isqrt``, the log2 of the log-int-softmax) unless a bound from the operands' ranges
shows int32 suffices; ONNX Runtime's int64 reductions and divisions are several times slower.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from models.integer import IntegerUnsupported
from models.integer.isqrt import BIT_SEARCH, NEWTON_STEPS
from models.integer.program import Node, Program
from models.integer.softmax import LOG2_FRACTION, MAX_HALVINGS, IntSoftmax, Log2Fit, MANTISSA_LOG2

__all__ = ["OPSET", "float_tensors", "save_int_only", "to_onnx", "write_int_only"]

OPSET = 17
INPUT, OUTPUT = "images", "logits"
TYPES = {"uint8": TensorProto.UINT8, "int8": TensorProto.INT8, "uint16": TensorProto.UINT16, "int16": TensorProto.INT16,
         "int32": TensorProto.INT32, "int64": TensorProto.INT64, "float32": TensorProto.FLOAT}  # fmt: skip
I32, I64, U64, U32 = TensorProto.INT32, TensorProto.INT64, TensorProto.UINT64, TensorProto.UINT32
EXP_TABLE_MAX = 2**16  # i-exp tables up to this many entries; finer score grids compute it elementwise
INT32_SUMS = 2**31  # sums bounded below this are taken in int32
WEIGHT_ZERO = 128  # GEMM weights are uint8 codes of this zero point (see _linear)


class _Graph:
    """ONNX nodes and constants under construction, with fresh names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0
        self._consts: dict[tuple, str] = {}
        self._int32: dict[str, str] = {}  # a narrowed tensor -> the int32 tensor it was cast from

    def name(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, value, dtype=np.int64, hint: str = "c") -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.name(hint)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def cast(self, x: str, to: int) -> str:
        if to == I32 and x in self._int32:  # the same values, already int32: no round trip
            return self._int32[x]
        return self.op("Cast", [x], to=to)

    def narrow(self, x: str, to: int) -> str:
        """Cast the int32 tensor ``x`` (its values in range) to ``to``; a later cast back to int32 reads ``x``."""
        if to == I32:
            return x
        y = self.op("Cast", [x], to=to)
        self._int32[y] = x
        return y

    def lookup(self, table: np.ndarray, index: str) -> str:
        """``table[index]`` for an int32 or int64 index tensor of any shape. GatherElements on the
        flattened indices, not Gather: ONNX Runtime's Gather copies element by element (~16x slower
        on fc1's output); the values are the same."""
        flat = self.op("Reshape", [index, self.const([-1])])
        picked = self.op("GatherElements", [self.const(table, table.dtype, "table"), flat], axis=0)
        return self.op("Reshape", [picked, self.op("Shape", [index])])

    def prune(self) -> None:
        """Drop the nodes and constants nothing reads (casts that :meth:`narrow` made redundant)."""
        used, kept = {OUTPUT}, []
        for node in reversed(self.nodes):
            if any(out in used for out in node.output):
                kept.append(node)
                used.update(node.input)
        self.nodes = kept[::-1]
        self.initializers = [t for t in self.initializers if t.name in used]

    def floor_div(self, x: str, divisor: int | str) -> str:
        """``floor(x / divisor)`` of a signed int64 tensor by a positive integer or tensor (ONNX's ``Div``
        truncates; ``Mod`` with ``fmod = 0`` takes the divisor's sign)."""
        d = self.const(divisor) if isinstance(divisor, int) else divisor
        return self.op("Div", [self.op("Sub", [x, self.op("Mod", [x, d], fmod=0)]), d])

    def int32(self, x: str, dtype: str) -> str:
        """The integer tensor ``x`` (the program's ``dtype``) as int32."""
        return x if dtype == "int32" else self.cast(x, I32)

    def shift_left(self, x: str, shift: str) -> str:
        """``x << shift`` of non-negative int64 tensors (through uint64)."""
        return self.cast(self.op("BitShift", [self.cast(x, U64), self.cast(shift, U64)], direction="LEFT"), I64)

    def shift_right(self, x: str, shift: str) -> str:
        """``floor(x / 2^shift)`` of a non-negative int64 ``x``, tensor ``shift``."""
        return self.cast(self.op("BitShift", [self.cast(x, U64), self.cast(shift, U64)], direction="RIGHT"), I64)


Emitter = Callable[[_Graph, Node, list[str], Program], list[str]]
EMITTERS: dict[str, Emitter] = {}


def emitter(op: str) -> Callable[[Emitter], Emitter]:
    def add(fn: Emitter) -> Emitter:
        EMITTERS[op] = fn
        return fn

    return add


def _out_type(program: Program, node: Node, i: int = 0) -> int:
    return TYPES[program.values[node.outputs[i]].dtype]


@emitter("quantize")
def _quantize(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    a, c = node.attrs, node.consts
    y = g.op("QuantizeLinear", [ins[0], g.const(c["scale"], np.float32, "scale"), g.const(c["zero"], np.uint8, "zero")])
    if a["lo"] > 0 or a["hi"] < 255:
        y = g.op("Clip", [y, g.const(a["lo"], np.uint8), g.const(a["hi"], np.uint8)])
    return [y]


@emitter("im2col")
def _im2col(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    kh, kw = node.attrs["kernel"]
    ch, h, w = program.meta["input_shape"]
    x = g.op("Reshape", [ins[0], g.const([-1, ch, h // kh, kh, w // kw, kw])])
    x = g.op("Transpose", [x], perm=[0, 2, 4, 1, 3, 5])
    return [g.op("Reshape", [x, g.const([-1, (h // kh) * (w // kw), ch * kh * kw])])]


@emitter("linear")
def _linear(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    # The int8 weight stored as uint8 + 128 with zero point 128 (the same products): uint8 x int8 kernels
    # of x86 CPUs without VNNI (AVX2's vpmaddubsw) saturate pairs of products at int16, uint8 x uint8 ones
    # are exact on every CPU.
    weight = g.const(node.consts["weight"].astype(np.int16) + WEIGHT_ZERO, np.uint8, "weight")
    zeros = [g.const(node.attrs["x_zero"], np.uint8, "zero"), g.const(WEIGHT_ZERO, np.uint8, "zero")]
    return [g.op("MatMulInteger", [ins[0], weight, *zeros])]


@emitter("matmul")
def _matmul(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    a = node.attrs
    kinds = [program.values[name].dtype for name in node.inputs]
    if kinds == ["uint8", "uint8"]:
        return [g.op("MatMulInteger", [ins[0], ins[1], g.const(a["a_zero"], np.uint8), g.const(a["b_zero"], np.uint8)])]
    # A wide operand (log2 attention weights): int32 MatMul of the centred operands (exact: |sums| < 2^31).
    operands = []
    for x, zero, kind in zip(ins, (a["a_zero"], a["b_zero"]), kinds):
        x = g.int32(x, kind)
        operands.append(g.op("Sub", [x, g.const(zero, np.int32)]) if zero else x)
    return [g.op("MatMul", operands)]


@emitter("requant")
def _requant(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    a, c = node.attrs, node.consts
    sh, lo, hi = a["shift"], a["lo"], a["hi"]
    # The sum's range from the inputs' bounds (each |M x| and their sum stay below 2^61, the lowering's bound).
    low = high = np.asarray(c["r"], np.int64)
    for i, x in enumerate(node.inputs):
        v, m = program.values[x], np.asarray(c[f"m{i}"], np.int64)
        low = low + np.minimum(m * int(v.lo), m * int(v.hi))
        high = high + np.maximum(m * int(v.lo), m * int(v.hi))
    # floor(sum / 2^sh) as a logical shift of sum + k 2^sh >= 0 (k folded into R), minus k: ONNX's
    # BitShift is unsigned only, and ONNX Runtime's int64 Div of such sums is several times slower.
    k = max(0, -(int(low.min()) >> sh))
    if int(high.max()) + (k << sh) >= 2**63:
        raise IntegerUnsupported(f"{node.name}: the offset sum leaves int64")
    acc = None
    for i, x in enumerate(ins):
        term = g.op("Mul", [g.cast(x, I64), g.const(c[f"m{i}"])])
        acc = term if acc is None else g.op("Add", [acc, term])
    acc = g.op("Add", [acc, g.const(np.asarray(c["r"], np.int64) + (k << sh))])
    shifted = g.op("BitShift", [g.cast(acc, U64), g.const(sh, np.uint64)], direction="RIGHT")  # y + k
    narrow = max((int(high.max()) >> sh) + k, hi + k) < 2**31 and lo + k >= -(2**31)
    kind, dtype = (I32, np.int32) if narrow else (I64, np.int64)
    y = g.op("Clip", [g.cast(shifted, kind), g.const(lo + k, dtype), g.const(hi + k, dtype)])
    if k:
        y = g.op("Sub", [y, g.const(k, dtype)])
    return [g.narrow(y, _out_type(program, node)) if narrow else g.cast(y, _out_type(program, node))]


def _bit_length(g: _Graph, v: str) -> str:
    """:func:`models.integer.isqrt.bit_length` step for step on a non-negative int64 tensor."""
    n = g.op("Mul", [v, g.const(0)])
    for step in BIT_SEARCH:
        shifted = g.shift_right(v, g.op("Add", [n, g.const(step)]))
        n = g.op("Add", [n, g.op("Mul", [g.cast(g.op("Greater", [shifted, g.const(0)]), I64), g.const(step)])])
    return g.op("Add", [n, g.cast(g.op("Greater", [v, g.const(0)]), I64)])


def _isqrt(g: _Graph, d: str) -> str:
    """:func:`models.integer.isqrt.isqrt` step for step on a non-negative int64 tensor."""
    positive = g.op("Max", [d, g.const(1)])
    n = _bit_length(g, positive)
    x = g.shift_left(g.const(1), g.op("Div", [g.op("Add", [n, g.const(1)]), g.const(2)]))
    for _ in range(NEWTON_STEPS):
        x = g.op("Div", [g.op("Add", [x, g.op("Div", [positive, x])]), g.const(2)])
    too_big = g.cast(g.op("Greater", [g.op("Mul", [x, x]), d]), I64)
    return g.op("Sub", [x, too_big])


def _sum_of_squares(g: _Graph, x: str, ln, codes) -> str:
    """``Q = sum_c X_c^2`` (int64, keepdims) of the int32 ``X``: summed in int32 over the longest runs of
    channels whose bound (from the input codes' range) stays below :data:`INT32_SUMS`, then the runs in
    int64; ONNX Runtime's int64 reductions are ~8x slower."""
    c = ln.channels
    top = np.maximum(np.abs(codes.lo - ln.zero), np.abs(codes.hi - ln.zero)).astype(np.int64) << ln.shift
    square = [int(t) ** 2 for t in top]
    run = next((k for k in range(c, 0, -1) if c % k == 0 and max(sum(square[i : i + k]) for i in range(0, c, k)) < INT32_SUMS), 0)
    if run == 0:
        return g.op("ReduceSumSquare", [g.cast(x, I64)], axes=[-1], keepdims=1)
    if run == c:
        return g.cast(g.op("ReduceSumSquare", [x], axes=[-1], keepdims=1), I64)
    lead = g.op("Slice", [g.op("Shape", [x]), g.const([0]), g.const([-1]), g.const([0])])
    runs = g.op("Reshape", [x, g.op("Concat", [lead, g.const([c // run, run])], axis=0)])
    partial = g.op("ReduceSumSquare", [runs], axes=[-1], keepdims=0)
    return g.op("ReduceSum", [g.cast(partial, I64), g.const([-1])], keepdims=1)


@emitter("layernorm")
def _layernorm(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    ln = node.attrs["layernorm"]
    axes = g.const([-1])
    # X_c, its sum S and C X - S fit int32 (the lowering checks it); the numerator needs int64.
    x = g.op("Sub", [g.int32(ins[0], program.values[node.inputs[0]].dtype), g.const(ln.zero, np.int32)])
    x = g.op("Mul", [x, g.const(np.left_shift(np.int64(1), ln.shift), np.int32)])
    s = g.op("ReduceSum", [x, axes], keepdims=1)
    q = _sum_of_squares(g, x, ln, program.values[node.inputs[0]])
    s64 = g.cast(s, I64)
    d = g.op("Add", [g.op("Sub", [g.op("Mul", [q, g.const(ln.channels)]), g.op("Mul", [s64, s64])]), g.const(ln.eps)])
    sigma = g.op("Max", [_isqrt(g, g.op("Mul", [d, g.const(4**ln.f)])), g.const(1)])
    centred = g.cast(g.op("Sub", [g.op("Mul", [x, g.const(ln.channels, np.int32)]), s]), I64)
    num = g.op("Add", [g.op("Mul", [centred, g.const(ln.gain)]), g.op("Mul", [g.const(ln.offset), sigma])])
    den = g.op("Mul", [sigma, g.const(2**ln.g)])
    # truncation and floor differ only below 0, which the clamp maps to lo >= 0 either way
    y = g.op("Div", [num, den]) if ln.lo >= 0 else g.floor_div(num, den)
    y = g.op("Clip", [y, g.const(ln.lo), g.const(ln.hi)])
    return [g.cast(y, _out_type(program, node))]


def _log2_fit(g: _Graph, v: str, fit: Log2Fit) -> str:
    """:class:`~models.integer.softmax.Log2Fit` on a non-negative int64 tensor (Horner, floors emulated)."""
    w = g.op("Sub", [g.op("Div", [v, g.const(2**fit.shift)]), g.const(fit.base)])
    p = g.op("Add", [g.op("Mul", [w, g.const(0)]), g.const(fit.coeffs[0])])
    for ck in fit.coeffs[1:]:
        p = g.op("Add", [g.floor_div(g.op("Mul", [p, w]), 2**16), g.const(ck)])
    return p


def _log2_fixed(g: _Graph, v: str) -> str:
    """:func:`~models.integer.softmax.log2_fixed` on a positive int64 tensor."""
    n = _bit_length(g, v)
    up = g.op("Max", [g.op("Sub", [g.const(16), n]), g.const(0)])
    down = g.op("Max", [g.op("Sub", [n, g.const(16)]), g.const(0)])
    m = g.shift_right(g.shift_left(v, up), down)
    return g.op("Add", [g.op("Mul", [g.op("Sub", [n, g.const(16)]), g.const(2**LOG2_FRACTION)]), _log2_fit(g, m, MANTISSA_LOG2)])


def _exp_span(sm: IntSoftmax) -> int:
    """``L``: every score ``d <= -L`` has the i-exp of ``-L`` (the clamp at ``MAX_HALVINGS`` halvings)."""
    limit, k = MAX_HALVINGS * sm.iexp.ln2, sm.iexp.shift
    return -(-limit // 2**k) if k >= 0 else limit << -k


def _exp_tables(sm: IntSoftmax, span: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The softmax's functions of ``d`` in ``[-span, 0]``, by the program's own integer code (so they are its
    values exactly): ``e`` and, for log2 codes, ``t``'s part that depends on ``d`` (both int32)."""
    exp_int, z, poly = sm.iexp(torch.arange(-span, 1, dtype=torch.int64))
    e = torch.bitwise_right_shift(exp_int, sm.rsh)
    if sm.kind != "log2":
        return e.to(torch.int32).numpy(), None
    one = 2**LOG2_FRACTION
    part = (z + sm.rsh + sm.exponent) * one + one // 2 - sm.poly_log2(poly)
    if part.abs().max() >= 2**30:
        raise IntegerUnsupported("the log2 softmax's table leaves int32")
    return e.to(torch.int32).numpy(), part.to(torch.int32).numpy()


@emitter("softmax")
def _softmax(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    sm: IntSoftmax = node.attrs["softmax"]
    iexp = sm.iexp
    axes = g.const([-1])
    x = g.int32(ins[0], program.values[node.inputs[0]].dtype)
    if "mask" in node.consts:  # (images * windows, heads, N, N) + (windows, 1, N, N), window by window
        mask = node.consts["mask"]
        windows, n = mask.shape[0], mask.shape[-1]
        heads = node.attrs["heads"]
        grouped = g.op("Reshape", [x, g.const([-1, windows, heads, n, n])])
        x = g.op("Reshape", [g.op("Add", [grouped, g.const(mask[:, None], np.int32)]), g.const([-1, heads, n, n])])
    top = g.op("ReduceMax", [x], axes=[-1], keepdims=1)
    scores = program.values[node.inputs[0]]
    reach = int(scores.hi - scores.lo) - (int(node.consts["mask"].min()) if "mask" in node.consts else 0)  # -d <= reach
    span = min(_exp_span(sm), reach)
    if span < EXP_TABLE_MAX:
        # i-exp (and log2's part) as tables on d + span, d clamped at -span (where the i-exp is constant,
        # or below every score): the same integers, one gather instead of a dozen elementwise passes.
        index = g.op("Max", [g.op("Sub", [x, g.op("Sub", [top, g.const(span, np.int32)])]), g.const(0, np.int32)])
        e_table, part_table = _exp_tables(sm, span)
        e = g.lookup(e_table, index)
    else:
        d = g.op("Sub", [x, top])  # <= 0
        if iexp.shift >= 0:
            fine = g.op("Mul", [d, g.const(2**iexp.shift, np.int32)])
        else:  # floor(d / 2^k) of d <= 0: -ceil(-d / 2^k)
            fine = g.op("Neg", [g.op("Div", [g.op("Add", [g.op("Neg", [d]), g.const(2**-iexp.shift - 1, np.int32)]), g.const(2**-iexp.shift, np.int32)])])
        fine = g.op("Max", [fine, g.const(-MAX_HALVINGS * iexp.ln2, np.int32)])
        z = g.op("Div", [g.op("Neg", [fine]), g.const(iexp.ln2, np.int32)])
        r = g.op("Add", [fine, g.op("Mul", [z, g.const(iexp.ln2, np.int32)])])
        t = g.op("Add", [r, g.const(iexp.b, np.int32)])
        poly = g.op("Add", [g.op("Mul", [t, t]), g.const(iexp.c, np.int32)])
        # poly < 2^29: shifts past 31 (undefined for uint32 in ONNX) give 0 either way
        shift = g.op("Min", [g.op("Add", [z, g.const(sm.rsh, np.int32)]), g.const(31, np.int32)])
        e = g.cast(g.op("BitShift", [g.cast(poly, U32), g.cast(shift, U32)], direction="RIGHT"), I32)
    total = g.op("ReduceSum", [e, axes], keepdims=1)
    if sm.kind in ("uniform", "twin"):
        tokens = node.attrs["tokens"]
        # int32 where e * mul + sum * half and sum * 2^g stay below 2^31 (rows of a few hundred tokens)
        wide = any(2**15 * n.mul + tokens * 2**15 * n.half >= 2**31 or tokens * 2**15 * 2**n.g >= 2**31 for n in (sm.norm, sm.fine) if n)
        kind, dtype = (I64, np.int64) if wide else (I32, np.int32)
        e_, total_ = g.cast(e, kind), g.cast(total, kind)

        def normalise(norm) -> str:  # non-negative: the Div's truncation is the floor
            num = g.op("Add", [g.op("Mul", [e_, g.const(norm.mul, dtype)]), g.op("Mul", [total_, g.const(norm.half, dtype)])])
            return g.op("Div", [num, g.op("Mul", [total_, g.const(2**norm.g, dtype)])])

        y = normalise(sm.norm)
        if sm.kind == "twin":
            fine = normalise(sm.fine)
            coarse = g.op("Add", [g.op("Clip", [y, g.const(0, dtype), g.const(sm.top, dtype)]), g.const(sm.top + 1, dtype)])
            y = g.op("Where", [g.op("Greater", [fine, g.const(sm.top, dtype)]), coarse, fine])
    else:
        one = 2**LOG2_FRACTION
        if span < EXP_TABLE_MAX:
            kind, dtype = I32, np.int32
            t = g.op("Add", [g.cast(_log2_fixed(g, g.cast(total, I64)), I32), g.lookup(part_table, index)])
        else:
            kind, dtype = I64, np.int64
            t = g.op("Sub", [_log2_fixed(g, g.cast(total, I64)), _log2_fit(g, g.cast(poly, I64), sm.poly_log2)])
            t = g.op("Add", [t, g.op("Mul", [g.cast(z, I64), g.const(one)])])
            t = g.op("Add", [t, g.const((sm.rsh + sm.exponent) * one + one // 2)])
        y = g.op("Div", [t, g.const(one, dtype)])  # truncation and floor differ only below 0, clamped to 0 either way
    y = g.op("Clip", [y, g.const(0, dtype), g.const(sm.hi, dtype)])
    return [g.narrow(y, _out_type(program, node)) if kind == I32 else g.cast(y, _out_type(program, node))]


@emitter("decode")
def _decode(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    a = node.attrs
    codes = g.int32(ins[0], program.values[node.inputs[0]].dtype)
    if a["kind"] == "twin":
        coarse = g.op("Mul", [g.op("Sub", [codes, g.const(a["top"] + 1, np.int32)]), g.const(2 ** a["shift"], np.int32)])
        return [g.op("Where", [g.op("Greater", [codes, g.const(a["top"], np.int32)]), coarse, codes])]
    amount = g.op("Max", [g.op("Sub", [g.const(a["top"], np.int32), codes]), g.const(0, np.int32)])
    weights = g.cast(g.op("BitShift", [g.const(1, np.uint32), g.cast(amount, U32)], direction="LEFT"), I32)
    keep = g.cast(g.op("Less", [codes, g.const(a["hi"], np.int32)]), I32)
    return [g.op("Mul", [weights, keep])]


@emitter("lookup")
def _lookup(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    index = g.int32(ins[0], program.values[node.inputs[0]].dtype)
    return [g.lookup(node.consts["table"], index)]


@emitter("reshape")
def _reshape(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    return [g.op("Reshape", [ins[0], g.const(node.attrs["shape"])])]


@emitter("transpose")
def _transpose(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    return [g.op("Transpose", [ins[0]], perm=list(node.attrs["perm"]))]


@emitter("slice")
def _slice(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    a = node.attrs
    return [g.op("Slice", [ins[0], g.const([a["start"]]), g.const([a["end"]]), g.const([a["axis"]])])]


@emitter("roll")
def _roll(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    x = ins[0]
    for shift, dim, size in zip(node.attrs["shifts"], node.attrs["dims"], node.attrs["sizes"]):
        k = shift % size
        if k == 0:
            continue
        tail = g.op("Slice", [x, g.const([size - k]), g.const([size]), g.const([dim])])
        head = g.op("Slice", [x, g.const([0]), g.const([size - k]), g.const([dim])])
        x = g.op("Concat", [tail, head], axis=dim)
    return [x]


@emitter("concat_const")
def _concat_const(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    prefix = node.consts["prefix"]
    dtype = np.uint8 if program.values[node.outputs[0]].dtype == "uint8" else np.uint16
    batch = g.op("Slice", [g.op("Shape", [ins[0]]), g.const([0]), g.const([1]), g.const([0])])
    shape = g.op("Concat", [batch, g.const(list(prefix.shape))], axis=0)
    tokens = g.op("Expand", [g.const(prefix[None].astype(dtype), dtype, "prefix"), shape])
    return [g.op("Concat", [tokens, ins[0]], axis=1)]


@emitter("sum")
def _sum(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    a = node.attrs
    return [g.op("ReduceSum", [g.int32(ins[0], program.values[node.inputs[0]].dtype), g.const(list(a["axes"]))], keepdims=int(a["keepdims"]))]


@emitter("dequantize")
def _dequantize(g: _Graph, node: Node, ins: list[str], program: Program) -> list[str]:
    return [g.op("DequantizeLinear", [ins[0], g.const(node.consts["scale"], np.float32, "logit_scale")])]


def to_onnx(program: Program) -> onnx.ModelProto:
    """The program as an ONNX model: ``images`` (float, dynamic batch) in, ``logits`` (float) out."""
    g = _Graph()
    names = {program.input: INPUT}
    for node in program.nodes:
        outs = EMITTERS[node.op](g, node, [names[i] for i in node.inputs], program)
        for value, out in zip(node.outputs, outs):
            names[value] = out
    g.nodes.append(helper.make_node("Identity", [names[program.output]], [OUTPUT], name="logits"))
    g.prune()
    ch, h, w = program.meta["input_shape"]
    graph = helper.make_graph(
        g.nodes, "int_only",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", ch, h, w])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", program.meta["classes"]])],
        g.initializers,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qvit-integer")
    model.ir_version = 8
    return model


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Every float tensor (by shape inference) other than the graph's input and output and the scales of
    its one QuantizeLinear and one DequantizeLinear: empty for an integer-only program."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    allowed = {INPUT, OUTPUT}
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            allowed.add(node.input[1])
            if node.op_type == "DequantizeLinear":
                allowed.add(node.output[0])
    floats = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    typed = [*g.value_info, *g.input, *g.output]
    out = [v.name for v in typed if v.type.tensor_type.elem_type in floats and v.name not in allowed]
    out += [t.name for t in g.initializer if t.data_type in floats and t.name not in allowed]
    quant = [n for n in g.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    if len(quant) != 2:
        out.append(f"{len(quant)} QuantizeLinear/DequantizeLinear nodes (expected 1 each)")
    return out


def write_int_only(program: Program | onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """Write the program's ONNX form to ``path`` (checked by ``onnx.checker``); returns the model."""
    model = program if isinstance(program, onnx.ModelProto) else to_onnx(program)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def save_int_only(program: Program | onnx.ModelProto, path: Path) -> tuple[onnx.ModelProto, str]:
    """The deployed ``int_only.onnx``: written, simplified (:func:`utils.onnx_export.simplify`), and
    saved without the ``value_info`` the simplifier records (shape inference derives them again; they
    were 3.5% of DeiT-tiny's file). Returns the model and the simplifier used."""
    from utils.onnx_export import simplify

    raw = path.with_name(f"{path.stem}.raw.onnx")
    write_int_only(program, raw)
    tool = simplify(raw, path)
    raw.unlink()
    model = onnx.load(str(path))
    del model.graph.value_info[:]
    onnx.save(model, str(path))
    return model, tool
