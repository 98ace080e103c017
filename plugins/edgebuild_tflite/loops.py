"""Unrolled time steps as one WHILE loop: a recurrent net's tables once, not once a step.

litert-torch unrolls an LSTM or GRU: T copies of one step's ops (12-13 after `fusion`), each ~45
bytes of tables. TensorFlow's own converter writes a Keras GRU as a WHILE loop, and this pass
does the same to the converted graph:
- the steps are found from the op that cuts the input sequence into steps (an UNPACK, or a SPLIT
  into pieces of one step): step j is what reads piece j and not piece j+1;
- the longest run of consecutive steps whose ops are the same (same ops, options, constants and
  output shapes and quantization, reading the step before in the same places) becomes a body
  subgraph: it gathers piece i of the sequence, runs one step and passes on what the next step
  reads. The first steps stay outside where the converter folded the zero initial state (a GRU's
  first, an LSTM's first two);
- the last step lacks what only a next step would read (the recurrent matmul): it joins the loop
  when its other ops match the body's, and the loop computes that matmul once for nothing. An
  output of it read after the loop that no step passes on (an LSTM's h, which the next step sees
  only through its matmul) becomes loop state of its own, zeros going in. After the loop the cut
  is read only for the steps outside it: their pieces become GATHERs and the cut goes;
- `y[:, -1]` of the concatenated steps becomes the last step itself first (a SLICE that takes
  exactly one input of a CONCATENATION), so a classifier does not keep every step alive;
- a net that outputs every step (a tagger, a CTC head, a stacked or bidirectional RNN's lower
  layer) concatenates the steps' outputs after the loop, in order or, for a backward direction,
  in reverse. The body writes each step's output into one block (DYNAMIC_UPDATE_SLICE at an
  offset it moves on by one step), the block starts as zeros (FILL) and the concatenation reads
  it in place of the steps' own tensors.
Nothing is rolled when a step's tensors are read outside the run otherwise (a single step's
output read on its own), when the collected outputs are not float32, or when steps differ.

The weights stay where they are (the body's tensors point at the same buffers). A weight that a
DEQUANTIZE expands is dequantized inside the body from the same buffer: the runtime expands a
constant once, where as loop state it would be copied in and out on every step (1.22-1.28x the
unrolled time, measured before this was done). At run time (bench/loops.py, 20 steps) a
classifier's loop is faster than the unrolled steps, 0.74-0.88x over runs, at fp32 and
weight-only alike, with the same answers. A tagger's loop is slower (1.29-1.33x for the 20-step
bidirectional GRU tagger, 27-29% fewer bytes at int8; 1.47-1.66x for the 100-frame GRU spotter,
66-68% fewer): the block is loop state, and the runtime's WHILE copies loop state from the body's
outputs to its inputs on every step. A target with a latency budget gets the unrolled steps
as candidates too (`<technique>-unrolled`, techniques.yaml); `android: {loops: unrolled}` fixes them.
`compaction` checks the rolled model against the unrolled one before keeping it.
"""
import copy
import dataclasses

import numpy as np
from ai_edge_litert import schema_py_generated as schema

from .graph import (OP, TYPE, builtin, constant_data, consumers, copy_tensor, detail_tensors, drop_unused,
                    float32_constant, int32_constant, int_constant, operator, quantization_key, same_quantization,
                    slice_window)

# Fewer steps than this stay unrolled: the loop's own tables would outweigh what it saves.
MIN_STEPS = 3
_GATHER_VERSIONS = {TYPE.FLOAT32: 1, TYPE.INT8: 2, TYPE.INT16: 4}


def roll(model) -> int:
    """Rewrite `model` (a ModelT) in place; returns how many steps went into loops."""
    rolled = 0
    for index in range(len(model.subgraphs)):  # the loop bodies appended here are not revisited
        subgraph = model.subgraphs[index]
        _last_step_slices(model, subgraph)
        cuts = [op for op in subgraph.operators if _step_axis(model, subgraph, op) is not None]
        for cut in cuts:
            steps = _roll(model, index, next(p for p, op in enumerate(subgraph.operators) if op is cut))
            if steps:
                _gather_what_is_left(model, subgraph, cut)
            rolled += steps
    if rolled:
        drop_unused(model)
    return rolled


def has_steps(model) -> bool:
    """Whether any op cuts a tensor into single steps (only then can `roll` change anything)."""
    return any(_step_axis(model, subgraph, op) is not None for subgraph in model.subgraphs for op in subgraph.operators)


def same_answers(unrolled: bytes, rolled: bytes, samples: int = 2) -> bool:
    """Whether the rolled model answers as the unrolled one on random inputs, within what kernel
    choice moves (the loop body runs outside XNNPACK): a relative 1e-3 of each output's range,
    or one quantization step of an integer output."""
    from ai_edge_litert.interpreter import Interpreter

    rng = np.random.default_rng(0)
    runners = [Interpreter(model_content=model, num_threads=1) for model in (unrolled, rolled)]
    for runner in runners:
        runner.allocate_tensors()
    for _ in range(samples):
        feeds = {}
        for detail in runners[0].get_input_details():
            shape, dtype = detail["shape"], detail["dtype"]
            feeds[detail["name"]] = (rng.standard_normal(shape).astype(dtype) if np.issubdtype(dtype, np.floating)
                                     else rng.integers(0, 8, shape).astype(dtype))
        answers = []
        for runner in runners:
            for detail in runner.get_input_details():
                runner.set_tensor(detail["index"], feeds[detail["name"]])
            runner.invoke()
            answers.append({d["name"]: runner.get_tensor(d["index"]) for d in runner.get_output_details()})
        expected, got = answers
        if expected.keys() != got.keys():
            return False
        for name, value in expected.items():
            if value.shape != got[name].shape:
                return False
            tolerance = (1.0 if not np.issubdtype(value.dtype, np.floating)
                         else 1e-3 * max(float(np.max(np.abs(value), initial=0.0)), 1e-6))
            if not np.all(np.abs(value.astype(np.float64) - got[name].astype(np.float64)) <= tolerance):
                return False
    return True


def _step_axis(model, subgraph, op) -> int | None:
    """The axis along which `op` cuts its input into single steps, or None."""
    code = builtin(model, op)
    if code == OP.UNPACK:
        return op.builtinOptions.axis % len(subgraph.tensors[int(op.inputs[0])].shape)
    if code == OP.SPLIT:
        axis = int_constant(model, subgraph, int(op.inputs[0]))
        shape = subgraph.tensors[int(op.inputs[1])].shape
        if axis is not None and len(axis) == 1 and shape[axis[0] % len(shape)] == len(op.outputs):
            return axis[0] % len(shape)
    return None


# ---- y[:, -1] --------------------------------------------------------------------------------------

def _last_step_slices(model, subgraph) -> None:
    """A SLICE taking, through reshapes, exactly one input of a CONCATENATION becomes a RESHAPE of
    that input; the concatenation goes when nothing else reads it."""
    producers = _producers(subgraph)
    changed = False
    for position, op in enumerate(subgraph.operators):
        if builtin(model, op) != OP.SLICE:
            continue
        piece = _sliced_piece(model, subgraph, producers, op)
        result = subgraph.tensors[int(op.outputs[0])]
        if piece is None or subgraph.tensors[piece].type != result.type or not same_quantization(subgraph.tensors[piece], result):
            continue
        shape = int32_constant(model, subgraph, [int(d) for d in result.shape])
        subgraph.operators[position] = operator(model, OP.RESHAPE, None, [piece, shape], [int(op.outputs[0])])
        changed = True
    if changed:
        _drop_dead(model, subgraph, {OP.CONCATENATION, OP.RESHAPE})


def _sliced_piece(model, subgraph, producers, op) -> int | None:
    window = slice_window(model, subgraph, op)
    if window is None:
        return None
    source, begin, size = window
    shape = [int(d) for d in subgraph.tensors[source].shape]
    # Row-major positions of the elements taken: reshapes keep them, a concatenation along an
    # axis after only ones lays its inputs one after the other.
    taken = np.arange(int(np.prod(shape))).reshape(shape)[tuple(slice(b, b + s) for b, s in zip(begin, size))].ravel()
    if not len(taken) or not np.array_equal(taken, np.arange(taken[0], taken[0] + len(taken))):
        return None
    tensor = source
    while tensor in producers and builtin(model, subgraph.operators[producers[tensor][0]]) == OP.RESHAPE:
        tensor = int(subgraph.operators[producers[tensor][0]].inputs[0])
    concat = subgraph.operators[producers[tensor][0]] if tensor in producers else None
    if concat is None or builtin(model, concat) != OP.CONCATENATION or concat.builtinOptions.fusedActivationFunction:
        return None
    axis = concat.builtinOptions.axis % len(subgraph.tensors[tensor].shape)
    if any(int(d) != 1 for d in subgraph.tensors[tensor].shape[:axis]):
        return None
    start = 0
    for piece in (int(i) for i in concat.inputs):
        count = int(np.prod(subgraph.tensors[piece].shape))
        if start == taken[0] and count == len(taken):
            return piece
        start += count
    return None


def _drop_dead(model, subgraph, pure: set[int]) -> None:
    """Remove ops of the `pure` kinds whose outputs nothing reads."""
    while True:
        readers, kept = consumers(subgraph), {int(i) for i in subgraph.outputs}
        dead = {p for p, op in enumerate(subgraph.operators) if builtin(model, op) in pure
                and not any(readers.get(int(t)) or int(t) in kept for t in op.outputs)}
        if not dead:
            return
        subgraph.operators = [op for p, op in enumerate(subgraph.operators) if p not in dead]


# ---- the loop ---------------------------------------------------------------------------------------

def _roll(model, subgraph_index: int, position: int) -> int:
    subgraph = model.subgraphs[subgraph_index]
    cut = subgraph.operators[position]
    axis = _step_axis(model, subgraph, cut)
    sequence = _sequence(model, cut)
    pieces = [int(t) for t in cut.outputs]
    readers = consumers(subgraph)
    reach = [_reach(subgraph, readers, t) for t in pieces]
    steps = [sorted(reach[j] - reach[j + 1]) for j in range(len(pieces) - 1)]
    made_by_steps = {int(t) for step in steps for p in step for t in subgraph.operators[p].outputs}
    forms = []
    for j, step in enumerate(steps):
        form = _form(model, subgraph, step, steps[j - 1] if j else [], pieces[j])
        if form is not None and form[2] & made_by_steps:
            form = None  # it reads a tensor of a step other than the one before
        forms.append(form)
    first, last = _longest_run([f[0] if f is not None else None for f in forms])
    if last - first + 1 < MIN_STEPS:
        return 0
    shape_form, carried, read_outside = forms[first]
    if not carried:
        return 0
    roles = sorted(carried)
    carried_in = [carried[role] for role in roles]
    # The last piece's step lacks what only a next step would read (a GRU's recurrent matmul):
    # the loop can still run it, computing that once for nothing, when the rest matches.
    plans = [(steps, last)]
    if last == len(steps) - 1:
        tail = _last_step(model, subgraph, readers, reach[-1], steps[last], shape_form, pieces[-1])
        if tail is not None:
            plans.insert(0, (steps + [tail], last + 1))
    for steps, last in plans:
        # None: a role the last step does not make; the loop's result for it is read by nobody.
        carried_out = [None if steps[last][i] is None else int(subgraph.operators[steps[last][i]].outputs[k])
                       for i, k in roles]
        inside = {p for j in range(first, last + 1) for p in steps[j] if p is not None}
        found = _collected(model, subgraph, readers, steps, (first, last), inside, carried_out)
        if found is not None:
            break
    else:
        return 0  # a step's tensor read after the loop, neither passed on nor collected
    collected, emitted = found
    # What only the last step's outputs give after the loop (an LSTM's h, which the next step
    # reads only through its matmul) is loop state too: zeros going in, the last step's coming out.
    emitted_fills = [_zeros(model, subgraph, subgraph.tensors[int(subgraph.operators[steps[last][i]].outputs[k])].shape)
                     for i, k in emitted]
    roles += emitted
    carried_in += [int(fill.outputs[0]) for fill in emitted_fills]
    carried_out += [int(subgraph.operators[steps[last][i]].outputs[k]) for i, k in emitted]
    constants = sorted(t for t in read_outside if constant_data(model, subgraph.tensors[t]) is not None)
    dequantized = _dequantized_constants(model, subgraph, read_outside)
    invariants = sorted(t for t in read_outside if t not in constants and t not in dequantized)

    counter_shape = _index_shape(model, cut)
    start = int32_constant(model, subgraph, np.full(counter_shape, first, np.int32))
    fills = [_zeros(model, subgraph, _block_shape(block)) for block in collected]
    # Where each block is written next: a vector the body moves on by one step (one ADD a step,
    # where computing it from the counter took a SUB and a broadcasting MUL).
    offsets = [int32_constant(model, subgraph, _offset(block, 0 if block.stride == 1 else len(block.positions) - 1))
               for block in collected]
    # The loop state, in this order: counter, carried, sequence, invariants, blocks, offsets.
    segments = [[start], carried_in, [sequence], invariants, [int(fill.outputs[0]) for fill in fills], offsets]
    state = [t for segment in segments for t in segment]
    body, body_state = _graph_with_inputs(subgraph, state)
    [counter], carried_body, [sequence_in], invariants_in, blocks_in, offsets_in = _split(body_state, segments)
    reads = {("carried",) + role: t for role, t in zip(roles, carried_body)}
    reads.update({("outside", t): b for t, b in zip(invariants, invariants_in)})
    reads.update({("outside", t): _copy_constant(subgraph, body, t) for t in constants})
    piece = copy_tensor(subgraph, body, pieces[first], buffer=0)
    reads[("piece",)] = piece
    body.operators = [_gather(model, subgraph.tensors[sequence], sequence_in, counter, piece, axis)]
    # A weight dequantized outside would enter the body as loop state, copied in and out on every
    # step; dequantized inside from the same buffer it is a constant the runtime expands once.
    for t, dequantize in sorted(dequantized.items()):
        op = copy.deepcopy(dequantize)
        op.inputs = [_copy_constant(subgraph, body, int(dequantize.inputs[0]))]
        op.outputs = [copy_tensor(subgraph, body, t, buffer=0)]
        reads[("outside", t)] = int(op.outputs[0])
        body.operators.append(op)
    made = {}
    for i, p in enumerate(steps[first]):
        op = copy.deepcopy(subgraph.operators[p])
        op.inputs = [-1 if entry == ("none",) else made[entry[1:]] if entry[0] == "local" else reads[entry]
                     for entry in shape_form[i][3]]
        outputs = []
        for k, t in enumerate(op.outputs):
            made[(i, k)] = copy_tensor(subgraph, body, int(t), buffer=0)
            outputs.append(made[(i, k)])
        op.outputs = outputs
        body.operators.append(op)
    written = [_write_step(model, body, block, made[block.role], block_in, offset_in)
               for block, block_in, offset_in in zip(collected, blocks_in, offsets_in)]
    one = int32_constant(model, body, np.ones(counter_shape, np.int32))
    following = copy_tensor(body, body, counter, buffer=0)
    body.operators.append(operator(model, OP.ADD, 1, [counter, one], [following], schema.BuiltinOptions.AddOptions,
                              schema.AddOptionsT()))
    body.outputs = [following, *[made[role] for role in roles], sequence_in, *invariants_in,
                    *(block for block, _ in written), *(offset for _, offset in written)]

    condition, condition_state = _graph_with_inputs(subgraph, state)
    limit = int32_constant(model, condition, np.full(counter_shape, last + 1, np.int32))
    going = schema.TensorT()
    going.shape, going.type, going.buffer = np.array(counter_shape, np.int32), TYPE.BOOL, 0
    condition.tensors.append(going)
    condition.operators = [operator(model, OP.LESS, 1, [condition_state[0], limit], [len(condition.tensors) - 1],
                               schema.BuiltinOptions.LessOptions, schema.LessOptionsT())]
    condition.outputs = [len(condition.tensors) - 1]

    # What the loop hands out: each carried role's last value as the tensor the steps outside
    # already read (a fresh one for a role the last step does not make), fresh tensors otherwise.
    fresh = _split([copy_tensor(subgraph, subgraph, t, buffer=0) for t in state], segments)
    fresh[1] = [out if out is not None else new for out, new in zip(carried_out, fresh[1])]
    results = [t for segment in fresh for t in segment]
    loop = operator(model, OP.WHILE, 1, state, results, schema.BuiltinOptions.WhileOptions, schema.WhileOptionsT(),
               condSubgraphIndex=len(model.subgraphs) + 1, bodySubgraphIndex=len(model.subgraphs))
    # Each concatenation reads the written block in place of the steps' own tensors (from the
    # last input backwards, so the positions still to replace do not move).
    for block, result in sorted(zip(collected, fresh[4]),
                                key=lambda pair: -min(pair[0].positions)):
        inputs = [int(i) for i in subgraph.operators[block.concat].inputs]
        low, high = min(block.positions), max(block.positions)
        subgraph.operators[block.concat].inputs = inputs[:low] + [result] + inputs[high + 1:]
    subgraph.operators = _in_order([op for p, op in enumerate(subgraph.operators) if p not in inside]
                                   + emitted_fills + fills + [loop])
    model.subgraphs += [body, condition]
    return last - first + 1


@dataclasses.dataclass(frozen=True)
class _Block:
    """One output of every step in the loop, concatenated after it: the loop writes them into one
    tensor (a block of the concatenation's inputs) instead of keeping each step's tensor."""
    role: tuple[int, int]  # (op index in the step, output index)
    concat: int  # position of the CONCATENATION in the subgraph
    positions: tuple[int, ...]  # where step first..last's tensors are among its inputs
    axis: int
    shape: tuple[int, ...]  # of one step's tensor
    stride: int  # +1: steps in order; -1: in reverse (a backward direction's outputs)


def _collected(model, subgraph, readers, steps, run, inside, carried_out) -> tuple[list[_Block], list] | None:
    """The steps' outputs read after the loop: (blocks of a concatenation, roles whose last-step
    tensor is read as such); None when a step's tensor is read after it otherwise (other than as
    the state the loop passes on)."""
    first, last = run
    kept_outputs = {int(o) for o in subgraph.outputs}
    read_by = {}  # role -> {step: concatenations reading that step's tensor}
    emitted = []
    for j in range(first, last + 1):
        for i, p in enumerate(steps[j]):
            if p is None:
                continue
            for k, t in enumerate(int(t) for t in subgraph.operators[p].outputs):
                after = [r for r in readers.get(t, []) if r not in inside]
                concats = [r for r in after if builtin(model, subgraph.operators[r]) == OP.CONCATENATION]
                if t not in carried_out and (t in kept_outputs or len(concats) != len(after)):
                    if j != last or not _fillable(subgraph.tensors[t]):
                        return None
                    emitted.append((i, k))
                if concats:
                    read_by.setdefault((i, k), {})[j] = concats
    blocks = []
    for role, concats in sorted(read_by.items()):
        if any(steps[j][role[0]] is None for j in range(first, last + 1)):
            return None
        tensors = [int(subgraph.operators[steps[j][role[0]]].outputs[role[1]]) for j in range(first, last + 1)]
        if set(concats) == {last} and tensors[-1] in carried_out:
            continue  # only the state passed on is read after the loop, by a later step
        block = _block(model, subgraph, role, concats, tensors, run)
        if block is None:
            return None
        blocks.append(block)
    return blocks, emitted


def _fillable(tensor) -> bool:
    """A float32 tensor of a fixed shape: FILL can make its zeros."""
    return tensor.type == TYPE.FLOAT32 and tensor.shape is not None and (
        tensor.shapeSignature is None or all(int(d) >= 0 for d in tensor.shapeSignature))


def _block(model, subgraph, role, concats, tensors, run) -> _Block | None:
    """The block of one CONCATENATION's inputs that `tensors` (one a step, in step order) are, in
    order or in reverse; None when they are anything else."""
    first, last = run
    if sorted(concats) != list(range(first, last + 1)) or any(len(c) != 1 or c != concats[first] for c in concats.values()):
        return None
    position = concats[first][0]
    concat = subgraph.operators[position]
    inputs = [int(i) for i in concat.inputs]
    if concat.builtinOptions.fusedActivationFunction or any(inputs.count(t) != 1 for t in tensors):
        return None
    positions = tuple(inputs.index(t) for t in tensors)
    stride = positions[1] - positions[0]
    sample = subgraph.tensors[tensors[0]]
    if stride not in (1, -1) or any(b - a != stride for a, b in zip(positions, positions[1:])) \
            or not _fillable(sample) or not len(sample.shape):
        return None  # the block's zeros are made at a fixed shape
    return _Block(role=role, concat=position, positions=positions, axis=concat.builtinOptions.axis % len(sample.shape),
                  shape=tuple(int(d) for d in sample.shape), stride=stride)


def _block_shape(block: _Block) -> list[int]:
    shape = list(block.shape)
    shape[block.axis] *= len(block.positions)
    return shape


def _zeros(model, subgraph, shape):
    """A FILL op (not yet in the subgraph) making float32 zeros of `shape`: the start of a block
    the loop writes, or of a state only its last step's value of matters."""
    shape = [int(d) for d in shape]
    dims = int32_constant(model, subgraph, shape)
    zero = float32_constant(model, subgraph, np.float32(0))
    filled = schema.TensorT()
    filled.shape, filled.type, filled.buffer = np.array(shape, np.int32), TYPE.FLOAT32, 0
    subgraph.tensors.append(filled)
    return operator(model, OP.FILL, 1, [dims, zero], [len(subgraph.tensors) - 1], schema.BuiltinOptions.FillOptions,
                    schema.FillOptionsT())


def _offset(block: _Block, steps: int) -> np.ndarray:
    """The start vector `steps` steps along the block's axis."""
    offset = np.zeros(len(block.shape), np.int32)
    offset[block.axis] = steps * block.shape[block.axis]
    return offset


def _write_step(model, body, block: _Block, step_tensor: int, written: int, offset: int) -> tuple[int, int]:
    """Ops appended to the loop body that write this step's tensor into the block at `offset` and
    move the offset one step on (back, for a block written in reverse); returns both results."""
    result = copy_tensor(body, body, written, buffer=0)
    body.operators.append(operator(model, OP.DYNAMIC_UPDATE_SLICE, 1, [written, step_tensor, offset], [result],
                                   schema.BuiltinOptions.DynamicUpdateSliceOptions, schema.DynamicUpdateSliceOptionsT()))
    step = int32_constant(model, body, _offset(block, block.stride))
    following = copy_tensor(body, body, offset, buffer=0)
    body.operators.append(operator(model, OP.ADD, 1, [offset, step], [following], schema.BuiltinOptions.AddOptions,
                                   schema.AddOptionsT()))
    return result, following


def _last_step(model, subgraph, readers, reach, previous, form, piece) -> list | None:
    """The ops of the last piece's step, one per op of `form` (the loop's step) or None where the
    last step has no such op; None when it is not that step. An op matches when it is the same
    op reading the same places: the piece, the step before (`previous`), its own ops, the same
    outside tensors. Ops left out may only be ones the matched ops do not read."""
    matched = []
    for code, opcode_index, options, entries, described in form:
        inputs = []
        for entry in entries:
            if entry[0] == "local":
                made = matched[entry[1]]
                inputs.append(None if made is None else int(subgraph.operators[made].outputs[entry[2]]))
            elif entry[0] == "carried":
                inputs.append(int(subgraph.operators[previous[entry[1]]].outputs[entry[2]]))
            else:
                inputs.append(-1 if entry == ("none",) else piece if entry == ("piece",) else entry[1])
        inner = [t for t, entry in zip(inputs, entries) if entry[0] in ("local", "carried", "piece")]
        found = []
        if None not in inputs and inner:
            found = [p for p in readers.get(inner[0], []) if p in reach and p not in matched
                     and [int(t) for t in subgraph.operators[p].inputs] == inputs
                     and _op_form(model, subgraph, subgraph.operators[p]) == (code, opcode_index, options, described)]
        matched.append(found[0] if len(found) == 1 else None)
    readers_of_piece = set(readers.get(piece, []))
    if not any(p is not None for p in matched) or not readers_of_piece <= set(matched):
        return None  # the piece is read by ops that are not the step's
    return matched


def _op_form(model, subgraph, op) -> tuple:
    """What makes two ops the same op, the tensors they read aside: (code, opcode index, options,
    output shapes, types and quantization)."""
    return (builtin(model, op), op.opcodeIndex, _options(op),
            tuple(_described(subgraph.tensors[int(t)]) for t in op.outputs))


def _sequence(model, cut) -> int:
    """The tensor a cut splits into steps: an UNPACK's input, a SPLIT's second (after the axis)."""
    return int(cut.inputs[0 if builtin(model, cut) == OP.UNPACK else 1])


def _index_shape(model, cut) -> list[int]:
    """The shape of a step index: UNPACK's pieces lack the step axis, so a scalar index (which
    GATHER drops) takes one; SPLIT's keep it, so an index [j] does."""
    return [] if builtin(model, cut) == OP.UNPACK else [1]


def _gather(model, sequence_tensor, sequence: int, index: int, piece: int, axis: int):
    """A GATHER (not yet in any subgraph) taking step `index` of `sequence` along `axis`."""
    return operator(model, OP.GATHER, _GATHER_VERSIONS.get(sequence_tensor.type, 1), [sequence, index], [piece],
                    schema.BuiltinOptions.GatherOptions, schema.GatherOptionsT(), axis=axis)


def _split(values: list, segments: list[list]) -> list[list]:
    """`values` cut into lists as long as each of `segments`."""
    parts, start = [], 0
    for segment in segments:
        parts.append(list(values[start:start + len(segment)]))
        start += len(segment)
    return parts


def _gather_what_is_left(model, subgraph, cut) -> None:
    """After the loop, the cut that made every step's piece is read only for the steps left
    outside it (the first ones): each of those pieces becomes a GATHER of the sequence, and the
    cut goes with the tensors of the pieces nobody reads (99 of a 100-frame spotter's UNPACK)."""
    readers, kept = consumers(subgraph), {int(o) for o in subgraph.outputs}
    pieces = [int(t) for t in cut.outputs]
    used = [j for j, t in enumerate(pieces) if readers.get(t) or t in kept]
    if len(used) * 3 >= len(pieces):
        return  # a GATHER and its index cost more than the unread pieces' tables
    axis, sequence, shape = _step_axis(model, subgraph, cut), _sequence(model, cut), _index_shape(model, cut)
    gathers = [_gather(model, subgraph.tensors[sequence], sequence,
                       int32_constant(model, subgraph, np.full(shape, j, np.int32)), pieces[j], axis)
               for j in used]
    position = next(p for p, op in enumerate(subgraph.operators) if op is cut)
    subgraph.operators[position:position + 1] = gathers


def _form(model, subgraph, step, previous, piece):
    """(a comparable form of the step's ops, what it reads of the step before by role (op index
    there, output index) -> tensor, the other tensors it reads from outside); None when an op
    cannot go into a loop."""
    local = {int(t): (i, k) for i, p in enumerate(step) for k, t in enumerate(subgraph.operators[p].outputs)}
    before = {int(t): (i, k) for i, p in enumerate(previous) for k, t in enumerate(subgraph.operators[p].outputs)}
    form, carried, outside = [], {}, set()
    for p in step:
        op = subgraph.operators[p]
        if op.customOptions is not None or (op.intermediates is not None and len(op.intermediates)) \
                or builtin(model, op) in (OP.WHILE, OP.IF, OP.CALL_ONCE):
            return None
        entries = []
        for t in (int(t) for t in op.inputs):
            if t < 0:
                entries.append(("none",))
            elif t in local:
                entries.append(("local",) + local[t])
            elif t == piece:
                entries.append(("piece",))
            elif t in before:
                entries.append(("carried",) + before[t])
                carried[before[t]] = t
            else:
                entries.append(("outside", t))
                outside.add(t)
        code, opcode_index, options, described = _op_form(model, subgraph, op)
        form.append((code, opcode_index, options, tuple(entries), described))
    return form, carried, outside


def _dequantized_constants(model, subgraph, tensors) -> dict:
    """Those of `tensors` that a DEQUANTIZE makes of a constant: tensor -> that op."""
    producers = _producers(subgraph)
    found = {}
    for t in tensors:
        op = subgraph.operators[producers[t][0]] if t in producers else None
        if op is not None and builtin(model, op) == OP.DEQUANTIZE \
                and constant_data(model, subgraph.tensors[int(op.inputs[0])]) is not None:
            found[t] = op
    return found


def _longest_run(forms) -> tuple[int, int]:
    """(first, last) of the longest run of equal consecutive forms; (0, -1) when there is none."""
    best, j = (0, -1), 0
    while j < len(forms):
        k = j
        while forms[j] is not None and k + 1 < len(forms) and forms[k + 1] == forms[j]:
            k += 1
        if forms[j] is not None and k - j > best[1] - best[0]:
            best = (j, k)
        j = k + 1
    return best


def _options(op):
    options = op.builtinOptions
    if options is None:
        return op.builtinOptionsType, None
    return op.builtinOptionsType, repr(sorted((k, v.tolist() if isinstance(v, np.ndarray) else v)
                                              for k, v in vars(options).items()))


def _described(tensor):
    return tuple(int(d) for d in tensor.shape), tensor.type, quantization_key(tensor)


def _graph_with_inputs(subgraph, state):
    """A new subgraph whose inputs are tensors shaped like `state` (tensors of `subgraph`)."""
    graph = schema.SubGraphT()
    graph.tensors, graph.operators = [], []
    graph.inputs = [copy_tensor(subgraph, graph, t, buffer=0) for t in state]
    return graph, list(graph.inputs)


def _copy_constant(source, graph, index) -> int:
    """A constant into `graph`, with the tensors its quantization points at (blockwise scales)."""
    copied = copy_tensor(source, graph, index)
    for field, pointed in detail_tensors(graph.tensors[copied]).items():
        setattr(graph.tensors[copied].quantization.details, field, copy_tensor(source, graph, pointed))
    return copied


def _producers(subgraph) -> dict[int, tuple[int, int]]:
    return {int(t): (p, k) for p, op in enumerate(subgraph.operators) for k, t in enumerate(op.outputs)}


def _reach(subgraph, readers, tensor) -> set[int]:
    """Positions of the ops that depend on `tensor`."""
    seen, todo = set(), list(readers.get(tensor, []))
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            for t in subgraph.operators[p].outputs:
                todo.extend(readers.get(int(t), []))
    return seen


def _in_order(ops):
    """`ops` with each after the ops whose outputs it reads, otherwise in the order given."""
    made_by = {int(t): i for i, op in enumerate(ops) for t in op.outputs}
    order, placed = [], set()
    for i in range(len(ops)):
        todo = [i]
        while todo:
            j = todo[-1]
            if j in placed:
                todo.pop()
                continue
            missing = [made_by[int(t)] for t in ops[j].inputs if int(t) in made_by and made_by[int(t)] not in placed]
            if missing:
                todo.extend(missing)
                continue
            placed.add(j)
            order.append(ops[j])
            todo.pop()
    return order
