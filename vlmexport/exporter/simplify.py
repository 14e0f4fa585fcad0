"""Fold the traced graphs' shape arithmetic into constants.

The TorchScript tracer records every `x.shape[...]` as nodes — Shape, Gather, Unsqueeze,
Concat, Div, Cast, Slice … — so each decoder layer recomputes the same reshape targets and
rotary half-widths on every step: ~40 nodes per layer, a third of what a cached step runs.
Most of those values do not depend on the dynamic axes at all (the rotary half-width is 32
whatever the batch), and the reshape targets that do are expressible as constants with
Reshape's own conventions (0 = keep this axis, -1 = infer one axis). Neither the exporter,
onnx's shape inference (it keeps no values) nor onnxscript's optimizer (it cannot see
through the batch and sequence axes) folds them, so this pass does.

How: the graph's dynamic axes are given several concrete sizes — all different, and each
sequence axis zero once, since the graphs accept empty prefixes, ids and pasts — and for each
assignment onnx's shape inference gives every activation's shape, from which onnx's
reference evaluator computes every value of the shape arithmetic. A value equal under every
assignment is a constant; a Reshape target that differs is replaced when a 0/-1 form
reproduces it under every assignment. Whatever cannot be shown so is left as traced. An
assignment at which the graph cannot run (a Reshape with no answer there, as a decoder's
`view(batch, length, -1, 64)` at length 0, which onnxruntime refuses) is left out: no call has
those sizes, and the three samples with every axis different still vary it.

Why sampling is a proof here, and where it is not: on sums and products of sizes and constants
(Add, Sub, Mul, Neg and the ops that only move values: Gather, Concat, Slice, ...), a value that
does not change when each axis in turn goes from its sample size to zero, nor when every axis
changes at once, does not depend on the axes. Comparisons, Min/Max, integer division and the
rest of STEP_OPS are step functions: `sequence < 4096` or `min(sequence, sliding_window)` or
`sequence // 64` is the same at every small sample and different near max_position_embeddings.
So nothing computed from a step op whose input depends on a dynamic axis is folded (refused,
not guessed); tests/test_simplify.py checks folded graphs against traced ones at sizes past
such thresholds, near max_position_embeddings and across Mistral's sliding window.
"""

from __future__ import annotations

from itertools import count

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference
from onnx.reference import ReferenceEvaluator

from vlmexport.bundle.names import BATCH

# Ops of shape arithmetic: cheap, exact on small integer tensors, no weights.
SHAPE_OPS = {
    "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Add", "Sub", "Mul", "Div", "Mod",
    "Neg", "Abs", "Min", "Max", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or",
    "Where", "Range", "Reshape", "ConstantOfShape", "Constant", "Identity", "Expand", "Floor", "Ceil", "Sqrt",
}  # fmt: skip
# Step functions of their inputs: a value computed from one of these with a size-dependent input
# may be equal at every sample and still change at another size, so it is never folded.
# (Where, Not, And, Or only pass on what a comparison decided; Range, ConstantOfShape and Expand
# only lay out what their inputs say: none of them is a step of its own.)
STEP_OPS = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Min", "Max", "Div", "Mod", "Floor", "Ceil", "Sqrt", "Abs"}
# Ops whose output elements are input elements (of the first input; the rest select which).
MOVES_VALUES = {"Gather", "Unsqueeze", "Squeeze", "Slice", "Reshape", "Identity", "Cast", "Expand"}
# Inputs (by position) whose values decide an output's shape.
SHAPE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Slice": (1, 2, 3, 4), "Tile": (1,), "Pad": (1,), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "Resize": (1, 2, 3), "Unsqueeze": (1,), "Squeeze": (1,), "Split": (1,), "TopK": (1,), "OneHot": (1,),
}  # fmt: skip
DECIDED_BY_SIGN = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Min"}
MAX_ELEMENTS = 64  # shape vectors and scalars; never an activation
CONSTANT_PREFIX = "vlmexport_shape_"
BASE_SIZES = (3, 5, 7, 11)  # distinct primes: a coincidence between axes cannot pass for a rule


MAX_ROUNDS = 4


def fold_shape_arithmetic(model: onnx.ModelProto) -> int:
    """Replace shape arithmetic that is constant under every size of the dynamic axes (and
    Reshape targets expressible with 0/-1) by initializers, drop the nodes left unused; in
    place. Returns how many nodes were removed.

    Repeated while it finds more: a Reshape with a constant target lets shape inference
    follow the graph further than one with a computed target."""
    removed = 0
    for _ in range(MAX_ROUNDS):
        found = _fold_once(model)
        removed += found
        if not found:
            break
    return removed


def _fold_once(model: onnx.ModelProto) -> int:
    graph = model.graph
    symbols = _base_symbols(graph)
    if not symbols:
        return 0
    assignments = _assignments(symbols)
    found = [_shape_values(model, sizes) for sizes in assignments]
    runs = [run for run in found if run is not None]
    if len(runs) < len(found):
        return 0  # shape inference could not follow the graph: leave it as traced
    # Sizes the traced graph cannot run at say nothing about it: there a Reshape has no single
    # answer (a -1 beside an empty axis, which onnxruntime refuses), so no call of the graph
    # has them, and what shape inference leaves unknown behind that Reshape would otherwise
    # keep every value downstream from being proven. (A decoder's `view(batch, length, -1, 64)`
    # at length 0: without this, no reshape target or rotary width of a decoder layer folds.)
    runnable = [_runnable(graph, *run) for run in runs]
    if not all(ok for ok, sizes in zip(runnable, assignments) if 0 not in sizes.values()):
        return 0  # not even at sizes with no empty axis: leave it as traced
    if runnable.count(False) > 1:
        return 0  # two axes left without their empty sample: `S - T` would look constant
    runs = [run for run, ok in zip(runs, runnable) if ok]
    shapes = [run[0] for run in runs]
    values = [run[1] for run in runs]
    produced_by_web = set(values[0])
    refused = _step_dependent(graph, values)
    taken = {i.name for i in graph.initializer}
    names = (name for i in count() if (name := f"{CONSTANT_PREFIX}{i}") not in taken)
    constants: dict[str, str | None] = {}  # arithmetic tensor → initializer holding its value
    before = len(graph.node)
    for node in graph.node:
        if node.op_type in SHAPE_OPS and all(o in produced_by_web for o in node.output):
            continue  # inside the arithmetic: goes if nothing else reads it
        for index, name in enumerate(node.input):
            if name not in produced_by_web:
                continue
            if name in refused:
                continue
            if name not in constants:
                value = _constant(name, values)
                constants[name] = None if value is None else _add_initializer(graph, value, next(names))
            replacement = constants[name]
            if replacement is None and node.op_type == "Reshape" and index == 1:
                target = _reshape_target(node.input[0], name, shapes, values)
                replacement = None if target is None else _add_initializer(graph, target, next(names))
            if replacement is not None:
                node.input[index] = replacement
    remove_unused(graph)
    return before - len(graph.node)


def _runnable(graph: onnx.GraphProto, shapes: dict[str, tuple[int, ...]], values: dict[str, np.ndarray]) -> bool:
    """False where a Reshape's target, at these sizes, resolves to no shape (onnxruntime fails there)."""
    for node in graph.node:
        if node.op_type == "Reshape" and node.input[0] in shapes and node.input[1] in values:
            target = [int(x) for x in values[node.input[1]]]
            if resolve_reshape(target, shapes[node.input[0]]) is None:
                return False
    return True


def _step_dependent(graph: onnx.GraphProto, values: list[dict[str, np.ndarray]]) -> set[str]:
    """Tensors of the shape arithmetic computed, at any depth, from a step op (STEP_OPS) one of
    whose inputs varies with the dynamic axes, unless `_decided_by_sign` proves the step —
    the values sampling cannot prove constant."""
    small = {i.name: numpy_helper.to_array(i) for i in graph.initializer if int(np.prod(i.dims)) <= MAX_ELEMENTS}
    values = [{**small, **run} for run in values]  # constants read from initializers are fixed too
    refused: set[str] = set()
    reshaped: set[str] = set()  # activations whose shape a refused value decided
    sizes: set[str] = set()  # every element that varies between assignments is a size (≥ 0)
    for node in graph.node:  # topological order (ONNX requires it)
        inputs = [name for name in node.input if name]
        op = node.op_type
        moves = op in MOVES_VALUES and inputs and inputs[0] in sizes and all(_fixed(n, values) for n in inputs[1:])
        joins = op == "Concat" and all(n in sizes or _fixed(n, values) for n in inputs)
        # Sums and products of sizes and non-negative constants are sizes (≥ 0 at every size).
        grows = op in ("Add", "Mul") and all((n in sizes or _fixed(n, values)) and n in values[0] and bool((values[0][n] >= 0).all()) for n in inputs)
        if op == "Shape" or moves or joins or grows:
            sizes.update(node.output)
        if op == "Shape":  # its value is its input's shape, whatever its input's values
            if inputs[0] in reshaped:
                refused.update(node.output)
        elif any(name in refused for name in inputs) or (op in STEP_OPS and any(not _fixed(n, values) for n in inputs) and not _decided_by_sign(node, sizes, values)):
            refused.update(node.output)
        positions = SHAPE_INPUTS.get(op, ())
        if any(name in reshaped for name in inputs) or any(i < len(node.input) and node.input[i] in refused for i in positions):
            reshaped.update(node.output)
    return refused


def _fixed(name: str, values: list[dict[str, np.ndarray]]) -> bool:
    """A tensor of the shape arithmetic with the same value under every assignment."""
    return name in values[0] and _constant(name, values) is not None


def _decided_by_sign(node: onnx.NodeProto, sizes: set[str], values: list[dict[str, np.ndarray]]) -> bool:
    """A comparison or Min/Max of sizes against a constant that the sign of a size decides at
    every size, not just the sampled ones: a size is ≥ 0, so `size == -1` is false, `size < 0`
    false, `size >= 0` true, `min(size, c)` = c for c ≤ 0 (transformers' `expand` traces
    `Where(Equal(shape, -1), 1, shape)`). Anything a size's upper bound would decide
    (`size < 4096`, `min(size, sliding_window)`) is not decided here, and so never folded."""
    if node.op_type not in DECIDED_BY_SIGN or len(node.input) != 2:
        return False
    first, second = node.input
    if first in sizes and _fixed(second, values):
        size, constant, swapped = first, values[0][second], False
    elif second in sizes and _fixed(first, values):
        size, constant, swapped = second, values[0][first], True
    else:
        return False
    runs = np.stack([np.broadcast_to(run[size], np.broadcast_shapes(run[size].shape, constant.shape)) for run in values])
    varying = (runs != runs[0]).any(0)  # positions where the size is not fixed
    at = np.broadcast_to(constant, varying.shape)[varying]
    op = node.op_type
    if swapped:  # c < s ⇔ s > c, and so on; Equal, Min and Max are symmetric
        op = {"Less": "Greater", "Greater": "Less", "LessOrEqual": "GreaterOrEqual", "GreaterOrEqual": "LessOrEqual"}.get(op, op)
    decided = {
        "Equal": at < 0,  # never equal
        "Less": at <= 0,  # never less
        "LessOrEqual": at < 0,  # never less or equal
        "Greater": at < 0,  # always greater
        "GreaterOrEqual": at <= 0,  # always greater or equal
        "Min": at <= 0,  # always the constant
    }[op]
    return bool(decided.all())


def _add_initializer(graph: onnx.GraphProto, value: np.ndarray, name: str) -> str:
    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _base_symbols(graph: onnx.GraphProto) -> list[str]:
    """Dynamic axis names of the inputs that are not sums of others (`past + sequence`)."""
    found = []
    for value in graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and "+" not in dim.dim_param and dim.dim_param not in found:
                found.append(dim.dim_param)
    return found


def _assignments(symbols: list[str]) -> list[dict[str, int]]:
    """Sizes per base symbol: three with every axis different (a polynomial in one size that
    meets a constant at two samples does not at a third, which matters where an empty axis is
    left out of the proof: _fold_once), one with batch 1, and one per other axis set to zero
    (the graphs take an empty prefix, ids or past)."""
    first = {s: BASE_SIZES[i % len(BASE_SIZES)] + 10 * (i // len(BASE_SIZES)) for i, s in enumerate(symbols)}
    second = {s: v + 6 for s, v in first.items()}
    third = {s: v + 12 for s, v in first.items()}
    out = [first, second, third]
    out += [{**first, s: 1 if s == BATCH else 0} for s in symbols]
    return out


def _size(dim_param: str, sizes: dict[str, int]) -> int:
    return sum(sizes[part.strip()] for part in dim_param.split("+"))


def _shape_values(model: onnx.ModelProto, sizes: dict[str, int]) -> tuple[dict[str, tuple[int, ...]], dict[str, np.ndarray]] | None:
    """(shape of every tensor, value of every shape-arithmetic tensor) with the axes at `sizes`."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_value = _size(dim.dim_param, sizes)
    for value in fixed.graph.output:
        value.type.tensor_type.ClearField("shape")
    told: set[str] = set()
    for _ in range(MAX_ROUNDS):
        try:
            inferred = shape_inference.infer_shapes(fixed, data_prop=True)
        except onnx.shape_inference.InferenceError:
            return None
        shapes, types = {}, {}
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            dims = value.type.tensor_type.shape.dim
            types[value.name] = value.type.tensor_type.elem_type
            if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
                shapes[value.name] = tuple(int(d.dim_value) for d in dims)
        values, evaluated = _evaluate_web(model, shapes)
        # Shape inference sizes no Range of a computed limit, nor an Expand to a computed shape
        # (GPT-2's and OPT's position ids, arange(length).unsqueeze(0).expand(1, -1)), nor what
        # they feed — at batch 1 not even the embeddings' sum, whose broadcast cannot tell 1
        # from n there. The evaluator just computed those tensors: shape inference is given
        # their shapes and goes again.
        learned = _learned(evaluated, shapes, types, told)
        if not learned:
            break
        told.update(info.name for info in learned)
        outputs = {o.name: o for o in fixed.graph.output}
        for info in learned:
            if info.name in outputs:  # shape inference reads an output's own declaration, not value_info
                outputs[info.name].CopyFrom(info)
            else:
                fixed.graph.value_info.append(info)
    return shapes, values


def _learned(evaluated: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], types: dict[str, int], told: set[str]) -> list[onnx.ValueInfoProto]:
    """The evaluated tensors shape inference has not sized, as declarations of their type and
    shape; none whose type the graph says is another (the evaluator would then not be
    computing what the graph does: better to tell nothing)."""
    found = []
    for name, array in evaluated.items():
        if name in shapes or name in told:
            continue
        elem_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        if types.get(name, onnx.TensorProto.UNDEFINED) in (onnx.TensorProto.UNDEFINED, elem_type):
            found.append(onnx.helper.make_tensor_value_info(name, elem_type, array.shape))
    return found


def _evaluate_web(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Values of the shape arithmetic: its nodes as a model of their own, each Shape of an
    activation replaced by an input fed that activation's (inferred) shape. Returns the values
    of at most MAX_ELEMENTS elements, and every output the evaluator computed."""
    graph = model.graph
    small = {i.name: i for i in graph.initializer if int(np.prod(i.dims)) <= MAX_ELEMENTS}
    known: set[str] = set(small)
    nodes, feeds = [], {}
    for node in graph.node:
        if node.op_type not in SHAPE_OPS:
            continue
        if node.op_type == "Shape":
            if node.input[0] not in shapes:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            full = np.array(shapes[node.input[0]], np.int64)
            feeds[node.output[0]] = full[slice(attrs.get("start", 0), attrs.get("end"))]
            known.add(node.output[0])
            continue
        if all(not name or name in known for name in node.input):
            nodes.append(node)
            known.update(node.output)
    if not nodes:
        return dict(feeds), {}
    inputs = [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in feeds]
    outputs = [onnx.helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for n in nodes for o in n.output]
    sub = onnx.helper.make_graph(nodes, "shape_arithmetic", inputs, outputs, list(small.values()))
    evaluator = ReferenceEvaluator(onnx.helper.make_model(sub, opset_imports=model.opset_import))
    try:
        results = evaluator.run(None, feeds)
    except Exception:  # the reference evaluator raises many types; nothing is folded then
        return dict(feeds), {}
    evaluated = {name: np.asarray(value) for name, value in zip([o.name for o in outputs], results)}
    values = dict(feeds)
    values.update({name: array for name, array in evaluated.items() if array.size <= MAX_ELEMENTS})
    return values, evaluated


def _constant(name: str, values: list[dict[str, np.ndarray]]) -> np.ndarray | None:
    """The value of `name` if it is the same under every assignment."""
    if not all(name in run for run in values):
        return None
    first = values[0][name]
    same = all(run[name].dtype == first.dtype and run[name].shape == first.shape and np.array_equal(run[name], first) for run in values)
    return first.copy() if same else None


def _reshape_target(data: str, target: str, shapes: list[dict[str, tuple[int, ...]]], values: list[dict[str, np.ndarray]]) -> np.ndarray | None:
    """A constant target — sizes, 0 (keep the input's axis), at most one -1 — giving the same
    output shape as the traced `target` under every assignment, or None."""
    if not all(data in s for s in shapes) or not all(target in v for v in values):
        return None
    inputs = [s[data] for s in shapes]
    traced = [[int(x) for x in v[target]] for v in values]
    if any(len(t) != len(traced[0]) for t in traced):
        return None
    resolved = [resolve_reshape(t, shape) for t, shape in zip(traced, inputs)]
    wanted = [w for w in resolved if w is not None]
    if len(wanted) < len(resolved):
        return None
    encoded = []
    for axis in range(len(traced[0])):
        column = [w[axis] for w in wanted]
        if len(set(column)) == 1 and column[0] > 0:
            encoded.append(column[0])
        elif all(axis < len(shape) and shape[axis] == size for shape, size in zip(inputs, column)):
            encoded.append(0)
        else:
            encoded.append(-1)
    if encoded.count(-1) > 1 or any(resolve_reshape(encoded, shape) != want for shape, want in zip(inputs, wanted)):
        return None
    return np.array(encoded, np.int64)


def resolve_reshape(encoded: list[int], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Reshape's output shape for `encoded` on an input of `shape` (allowzero=0), or None
    where that is not well defined."""
    if encoded.count(-1) > 1 or any(d == 0 and i >= len(shape) for i, d in enumerate(encoded)):
        return None
    dims = [shape[i] if d == 0 else d for i, d in enumerate(encoded)]
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        total = int(np.prod(shape))
        if known == 0:
            return None  # -1 beside an empty axis is ambiguous
        dims[dims.index(-1)] = total // known
    return tuple(dims)


def remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes (and initializers added above) that nothing reads, repeatedly."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, node in enumerate(graph.node) if not any(o in used for o in node.output)]
        if not dead:
            break
        for index in reversed(dead):
            del graph.node[index]
    used = {name for node in graph.node for name in node.input} | outputs
    for index in reversed(range(len(graph.initializer))):
        if graph.initializer[index].name not in used:
            del graph.initializer[index]  # the traced graph's own constants, and ones added above
