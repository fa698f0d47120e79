"""Golden vectors: one block of the dump reproduced by plain numpy integer code written here from the
formulas of docs/integer.md, independently of the project's implementation (as a hardware team would)."""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from conftest import calibrated, tiny_images
from models.integer.golden import FORMAT, write_golden
from models.integer.lower import lower


def _layernorm(u, a, c):
    x = (u.astype(np.int64) - c["zero"]) << c["shift"]
    channels = x.shape[-1]
    s = x.sum(-1, keepdims=True)
    q = (x * x).sum(-1, keepdims=True)
    d = channels * q - s * s + a["eps"]
    sigma = np.vectorize(lambda v: max(math.isqrt(int(v) << (2 * a["f"])), 1), otypes=[np.int64])(d)
    num = (channels * x - s) * c["gain"] + c["offset"] * sigma
    return np.clip(num // (sigma << a["g"]), a["lo"], a["hi"])


def _softmax(x, a):
    d = x.astype(np.int64) - x.max(-1, keepdims=True)
    e = a["iexp"]
    fine = d << e["shift"] if e["shift"] >= 0 else d >> -e["shift"]
    fine = np.maximum(fine, -30 * e["ln2"])
    z = (-fine) // e["ln2"]
    r = fine + z * e["ln2"]
    exp = ((r + e["b"]) ** 2 + e["c"]) >> z
    v = exp >> a["rsh"]
    total = v.sum(-1, keepdims=True)
    assert a["kind"] == "uniform"
    n = a["norm"]
    return np.clip((v * n["mul"] + total * n["half"]) // (total << n["g"]), 0, a["hi"])


def _replay(node, inputs, consts):
    op, a = node["op"], node["attrs"]
    x = inputs[0]
    if op == "layernorm":
        return _layernorm(x, a["layernorm"], consts)
    if op == "linear":
        return (x.astype(np.int64) - a["x_zero"]) @ consts["weight"].astype(np.int64)
    if op == "matmul":
        return (x.astype(np.int64) - a["a_zero"]) @ (inputs[1].astype(np.int64) - a["b_zero"])
    if op == "requant":
        acc = consts["r"] + sum(xi.astype(np.int64) * consts[f"m{i}"] for i, xi in enumerate(inputs))
        return np.clip(acc >> a["shift"], a["lo"], a["hi"])
    if op == "softmax":
        return _softmax(x, a["softmax"])
    if op == "lookup":
        return consts["table"][x]
    if op == "reshape":
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(a["shape"])])
    if op == "transpose":
        return x.transpose(a["perm"])
    if op == "slice":
        return np.take(x, range(a["start"], a["end"]), axis=a["axis"])
    raise AssertionError(f"block 0 has no {op} node")


def test_one_block_of_golden_vectors_is_reproduced_by_independent_numpy(tmp_path):
    qvit = calibrated("fqvit_w8a8_att8")
    program = lower(qvit)
    facts = write_golden(program, tiny_images(2, seed=3), tmp_path / "golden")
    index = json.loads((tmp_path / "golden" / "program.json").read_text())
    tensors = np.load(tmp_path / "golden" / "tensors.npz")
    constants = np.load(tmp_path / "golden" / "constants.npz")
    assert index["format"] == FORMAT and facts["images"] == 2 == index["images"]
    # Every tensor but the images is an integer of its declared type; every node's constants are listed.
    for name, info in index["tensors"].items():
        assert str(tensors[name].dtype) == info["dtype"] and list(tensors[name].shape) == info["shape"]
        assert tensors[name].dtype.kind in "iu" or name in (index["input"], index["output"])
    block = [n for n in index["nodes"] if n["name"].startswith("blocks.0.")]
    assert {n["op"] for n in block} >= {"layernorm", "linear", "requant", "matmul", "softmax", "lookup"}
    for node in block:
        consts = {key.split("/", 1)[1]: constants[key] for key in node["constants"]}
        out = _replay(node, [tensors[i] for i in node["inputs"]], consts)
        assert np.array_equal(out, tensors[node["outputs"][0]].astype(np.int64)), node["name"]
    # The dump's logits are the executor's, and its grids dequantize to the fake-quant model's points.
    with torch.no_grad():
        logits = qvit(torch.from_numpy(tensors[index["input"]]))
    assert np.allclose(tensors[index["output"]], logits.numpy(), atol=1e-5 * float(logits.abs().max()))
