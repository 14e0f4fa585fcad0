"""Write one module as an ONNX file, store shared weights once, describe a graph's signature."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

TWO_GB = 2**31
# Below this, duplicated constants are not worth a node (shape vectors, scalars).
DEDUPE_MIN_ELEMENTS = 1024


def export_module(module: torch.nn.Module, args: tuple[torch.Tensor, ...], path: Path, opset: int) -> None:
    """Trace `module` with the TorchScript exporter (fast here, and exact for these models)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about shape-dependent Python branches; graphs.py documents why
        # the ones in transformers' cache and mask code are safe, and tests prove it.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=module.input_names,
            output_names=module.output_names,
            dynamic_axes=module.dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _nbytes(init: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its shape and type (reading raw_data would copy it)."""
    return int(np.prod(init.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _repeated_initializers(graph: onnx.GraphProto) -> tuple[dict[str, str], dict[str, str]]:
    """(copies → original, transposed copies → original) among the large initializers."""
    # Named parameters first, so they are the copies kept and folded `onnx::` constants go.
    candidates = sorted(
        (i for i in graph.initializer if np.prod(i.dims) >= DEDUPE_MIN_ELEMENTS), key=lambda i: i.name.startswith("onnx::")
    )
    by_digest: dict[tuple[str, tuple[int, ...], int], str] = {}
    renames: dict[str, str] = {}
    transposed: dict[str, str] = {}
    for init in candidates:
        array = numpy_helper.to_array(init)
        key = (_digest(array), tuple(init.dims), init.data_type)
        if key in by_digest:
            renames[init.name] = by_digest[key]
            continue
        flipped = (_digest(array.T), tuple(init.dims[::-1]), init.data_type) if array.ndim == 2 else None
        if flipped in by_digest:
            transposed[init.name] = by_digest[flipped]
            continue
        by_digest[key] = init.name
    return renames, transposed


def store_shared_weights_once(model: onnx.ModelProto) -> int:
    """Replace initializers that repeat another one (or its transpose) by a reference to it.

    Constant folding turns a tied LM head `h @ E.T` into a second, transposed copy of the
    embedding E (113 MB for SmolLM-135M); no maintained ONNX tool undoes that, so this
    pass does: identical copies are renamed to the original, transposed copies become a
    Transpose node reading the original. Returns the bytes saved.
    """
    graph = model.graph
    # In a helper, so no reference to a message outlives the search (it would keep a copy alive below).
    renames, transposed = _repeated_initializers(graph)
    if not renames and not transposed:
        return 0
    saved = 0
    for name, original in transposed.items():
        graph.node.insert(0, helper.make_node("Transpose", [original], [name], name=f"{name}_from_shared", perm=[1, 0]))
    # Deleted where they stand: rebuilding the list would copy every kept initializer.
    for index in reversed(range(len(graph.initializer))):
        init = graph.initializer[index]
        if init.name in renames or init.name in transposed:
            saved += _nbytes(init)
            del graph.initializer[index]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    return saved


def pin_static_axes(model: onnx.ModelProto, dynamic_axes: dict[str, dict[int, str]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Declare every axis that is not dynamic as the integer it was traced with.

    The tracer names axes it could not prove static (e.g. `LayerNormalization..._dim_1`);
    consumers need patches, hidden sizes, KV heads and head_dim as fixed integers.
    """
    for value in [*model.graph.input, *model.graph.output]:
        if value.name not in shapes:
            continue
        dynamic = dynamic_axes.get(value.name, {})
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if axis not in dynamic:
                dim.Clear()
                dim.dim_value = int(shapes[value.name][axis])


def finalize(path: Path, dynamic_axes: dict[str, dict[int, str]], shapes: dict[str, tuple[int, ...]]) -> int:
    """Post-process an exported file in place: static axes pinned, shared weights once,
    external data only over 2 GB. Returns the bytes saved by sharing."""
    model = onnx.load(str(path))
    pin_static_axes(model, dynamic_axes, shapes)
    saved = store_shared_weights_once(model)
    # Weights dominate the size; ByteSize() would serialise the whole model once more to count it.
    large = sum(_nbytes(init) for init in model.graph.initializer) >= TWO_GB
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + "_data")
    else:
        onnx.save_model(model, str(path))
    return saved


DTYPES = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.FLOAT16: "float16", TensorProto.INT32: "int32"}


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tensor.shape.dim]
    return {"name": value.name, "dtype": DTYPES.get(tensor.elem_type, str(tensor.elem_type)), "shape": dims}


def signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs (names, dtypes, shapes with symbolic axes) without loading weights."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in inits],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def initializer_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
