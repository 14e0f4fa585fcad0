"""Write one module as an ONNX file, store shared weights once, describe a graph's signature."""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from vlmexport.errors import BundleError
from vlmexport.exporter.attention import PENDING_DOMAIN
from vlmexport.exporter.attention_layout import fold_attention_layout
from vlmexport.exporter.fuse import fuse_parallel_matmuls
from vlmexport.exporter.simplify import fold_shape_arithmetic

TWO_GB = 2**31
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx's TorchScript exporter writes no later opset
SHARED_SUFFIX = "_from_shared"  # a Transpose reading a table stored once (see quantize/shared.py)
# Below this, duplicated constants are not worth a node (shape vectors, scalars).
DEDUPE_MIN_ELEMENTS = 1024


def trace_graph(module: torch.nn.Module, args: tuple[torch.Tensor, ...], opset: int) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    """Trace `module` with the TorchScript exporter (fast here, and exact for these models) into
    a graph without weights: each parameter is a graph input named as in the state dict. Returns
    the graph and the parameters it reads, by input name (unused ones, e.g. SigLIP's pooling
    head, are not in the graph).

    Why parameters go in as inputs: with them as constants, the exporter holds the weights
    three more times while serialising (its C++ proto, the serialised string, the Python copy)
    and constant-folds a transposed copy of the tied head. As inputs, nothing is folded into
    them — the tied head is a Transpose of the embedding, the form it must be stored in
    anyway — and `write_graph` streams them into the file one tensor at a time.
    """
    params = dict(module.named_parameters())  # a tied head is listed once, under the embedding
    names = list(params)
    count = len(module.input_names)
    forward = module.forward

    def forward_with_inputs_as_parameters(*inputs: torch.Tensor) -> Any:
        with _parameters_replaced(module, dict(zip(names, inputs[count:]))):
            return forward(*inputs[:count])

    buffer = io.BytesIO()
    module.forward = forward_with_inputs_as_parameters  # an instance attribute: no extra scope in node names
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The tracer warns about shape-dependent Python branches; graphs.py documents why
            # the ones in transformers' cache and mask code are safe, and tests prove it.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (*args, *params.values()),
                buffer,
                input_names=[*module.input_names, *names],
                output_names=module.output_names,
                dynamic_axes=module.dynamic_axes,
                opset_version=min(opset, TORCHSCRIPT_MAX_OPSET),
                do_constant_folding=True,
                dynamo=False,
            )
    finally:
        del module.forward
    model = onnx.load_model_from_string(buffer.getvalue())
    adopt_pending_ops(model, opset)
    used = {value.name for value in model.graph.input}
    return model, {name: tensor for name, tensor in params.items() if name in used}


def adopt_pending_ops(model: onnx.ModelProto, opset: int) -> None:
    """Give the graph the default-domain `opset` it was asked for, with the opset-23 ops traced
    under attention.PENDING_DOMAIN moved into the default domain.

    The TorchScript exporter writes at most opset 20. Between 20 and 23 the default-domain
    operators this exporter emits changed only by accepting more types (the one semantic
    change, GroupNormalization in 21, is never emitted for these models), so the graph means
    the same at 23; onnx.checker's full check at the end of export re-validates every node.
    """
    if opset <= TORCHSCRIPT_MAX_OPSET:
        return
    for node in model.graph.node:
        if node.domain == PENDING_DOMAIN:
            node.domain = ""
    imports = [entry for entry in model.opset_import if entry.domain not in ("", PENDING_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", opset), *imports])


@contextmanager
def _parameters_replaced(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, every parameter of `module` (a tied one in each of its places) is the
    given tensor. What torch.func.functional_call does, which refuses to run under the tracer."""
    first_name = {id(p): name for name, p in module.named_parameters()}
    slots = []
    for name, parameter in list(module.named_parameters(remove_duplicate=False)):
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        slots.append((owner, attribute, parameter))
        del owner._parameters[attribute]
        setattr(owner, attribute, tensors[first_name[id(parameter)]])
    try:
        yield
    finally:
        for owner, attribute, parameter in slots:
            delattr(owner, attribute)
            owner.register_parameter(attribute, parameter)


def write_graph(
    model: onnx.ModelProto,
    weights: dict[str, torch.Tensor],
    path: Path,
    dynamic_axes: dict[str, dict[int, str]],
    shapes: dict[str, tuple[int, ...]],
) -> dict[str, list[dict[str, Any]]]:
    """Write a traced graph with its parameters as initializers: static axes pinned to integers,
    shape arithmetic folded, MatMuls that read one activation fused (fuse.py), the tied head's
    Transpose marked as reading a shared table (`*_from_shared`, what quantize looks for), the
    weights streamed from the tensors; external data only over 2 GB. Returns the graph's
    signature (reading it back would load the weights)."""
    graph = model.graph
    pin_static_axes(model, dynamic_axes, shapes)
    fold_shape_arithmetic(model)  # while the weights are still declared inputs, with their shapes
    fold_attention_layout(model)  # needs the Reshape targets folded
    weights = dict(weights)
    fuse_parallel_matmuls(graph, weights)
    inputs = [value for value in graph.input if value.name not in weights]
    del graph.input[:]
    graph.input.extend(inputs)
    for node in graph.node:
        if node.op_type == "Transpose" and node.input[0] in weights and weights[node.input[0]].dim() == 2:
            node.name = f"{node.output[0]}{SHARED_SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    described = graph_signature(model)
    arrays = [(name, tensor.detach().numpy()) for name, tensor in weights.items()]  # views, no copies
    if sum(array.nbytes for _, array in arrays) >= TWO_GB:
        _write_external(model, arrays, path)
    else:
        _write_streamed(model, arrays, path)
    return described


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload_size: int) -> bytes:
    """Tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(payload_size)


GRAPH_FIELD = 7  # ModelProto.graph
INITIALIZER_FIELD = 5  # GraphProto.initializer


def _write_streamed(model: onnx.ModelProto, arrays: list[tuple[str, np.ndarray]], path: Path) -> None:
    """`model` with `arrays` appended as its initializers, written one tensor at a time.

    onnx.save_model needs the whole model as one proto and then its serialised copy: three
    times the weights at once. Protobuf lets fields come in any order and keeps a repeated
    field's elements in the order written, so the file is: the model without its graph, then
    the graph field, whose bytes are the graph without the weights followed by one
    `initializer` entry per tensor. Each tensor is serialised twice (its size is needed
    before the graph's length prefix), one at a time. onnx.load reads back the same model.
    """

    def tensor_bytes(name: str, array: np.ndarray) -> bytes:
        return numpy_helper.from_array(array, name).SerializeToString()

    sizes = [len(tensor_bytes(name, array)) for name, array in arrays]
    head = onnx.ModelProto()
    head.CopyFrom(model)
    head.ClearField("graph")
    graph = model.graph.SerializeToString()
    graph_size = len(graph) + sum(len(_field(INITIALIZER_FIELD, size)) + size for size in sizes)
    with open(path, "wb") as out:
        out.write(head.SerializeToString())
        out.write(_field(GRAPH_FIELD, graph_size))
        out.write(graph)
        for (name, array), size in zip(arrays, sizes):
            data = tensor_bytes(name, array)
            if len(data) != size:
                raise BundleError(f"{name} serialised to {len(data)} bytes, then {size}", "report this as a vlmexport bug")
            out.write(_field(INITIALIZER_FIELD, size))
            out.write(data)


def _write_external(model: onnx.ModelProto, arrays: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Graphs over protobuf's 2 GB limit: the weights in `<file>_data`, written tensor by tensor."""
    location = path.name + "_data"
    offset = 0
    with open(path.parent / location, "wb") as data:
        for name, array in arrays:
            tensor = onnx.TensorProto(name=name, dims=array.shape, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
                tensor.external_data.add(key=key, value=value)
            data.write(np.ascontiguousarray(array).data)
            offset += array.nbytes
            model.graph.initializer.append(tensor)
    onnx.save_model(model, str(path))


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _nbytes(init: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, from its shape and type (reading raw_data would copy it)."""
    return int(np.prod(init.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def _repeated_initializers(graph: onnx.GraphProto, min_elements: int) -> tuple[dict[str, str], dict[str, str]]:
    """(copies → original, transposed copies → original) among initializers of `min_elements` or more."""
    # Named parameters first, so they are the copies kept and folded `onnx::` constants go.
    candidates = sorted(
        (i for i in graph.initializer if np.prod(i.dims) >= min_elements), key=lambda i: i.name.startswith("onnx::")
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


def store_shared_weights_once(model: onnx.ModelProto, min_elements: int = DEDUPE_MIN_ELEMENTS) -> int:
    """Replace initializers that repeat another one (or its transpose) by a reference to it.

    Quantizers (and constant folding) turn a tied LM head `h @ E.T` into a second, transposed
    copy of the embedding E (113 MB for SmolLM-135M at fp32); no maintained ONNX tool undoes
    that, so this pass does: identical copies are renamed to the original, transposed copies
    become a Transpose node reading the original. Returns the bytes saved.
    """
    graph = model.graph
    # In a helper, so no reference to a message outlives the search (it would keep a copy alive below).
    renames, transposed = _repeated_initializers(graph, min_elements)
    if not renames and not transposed:
        return 0
    saved = 0
    for name, original in transposed.items():
        graph.node.insert(0, helper.make_node("Transpose", [original], [name], name=f"{name}{SHARED_SUFFIX}", perm=[1, 0]))
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


DTYPES: dict[int, str] = {TensorProto.FLOAT: "float32", TensorProto.INT64: "int64", TensorProto.FLOAT16: "float16", TensorProto.INT32: "int32"}


def _value_info(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    dims = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in tensor.shape.dim]
    return {"name": value.name, "dtype": DTYPES.get(tensor.elem_type, str(tensor.elem_type)), "shape": dims}


def signature(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Inputs and outputs (names, dtypes, shapes with symbolic axes) of a graph file."""
    return graph_signature(onnx.load(str(path), load_external_data=False))


def graph_signature(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    """Inputs (initializers excluded) and outputs: names, dtypes, shapes with symbolic axes."""
    inits = {i.name for i in model.graph.initializer}
    return {
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in inits],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def initializer_bytes(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)
