"""An unrolled GRU or LSTM ships as one WHILE loop (issue #17): one step's ops once, not once a step.
The answers stay those of the unrolled model (within what XNNPACK vs builtin kernels move), at
fp32 and at every quantization; a net that outputs every step writes them into one block inside
the loop, both directions of a bidirectional net roll; a step read on its own after the loop keeps
the steps unrolled; a wrong loop is never kept; `android: {loops: unrolled}` keeps the steps."""
import collections
import shutil

import numpy as np
import pytest

from test_fusion import FEATURES, RECURRENT, STEPS, _ops

SEQUENCE_OUT = RECURRENT.replace("return self.head(y[:, -1])", "return self.head(y)")
# Two layers, both directions: the backward direction's steps land in the sequence in reverse.
STACKED_BIDIRECTIONAL = SEQUENCE_OUT.replace("(32, 32, batch_first=True)",
                                             "(32, 32, num_layers=2, bidirectional=True, batch_first=True)")
STACKED_BIDIRECTIONAL = STACKED_BIDIRECTIONAL.replace("nn.Linear(32, 4)", "nn.Linear(64, 4)")
# Every step, and step 2 on its own as a second output.
ONE_STEP_ALSO = RECURRENT.replace("return self.head(y[:, -1])", "return self.head(y), y[:, 2]")


def _subgraphs(bundle) -> list[collections.Counter]:
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    names = {code: name for name, code in vars(schema.BuiltinOperator).items() if not name.startswith("_")}
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))
    codes = model.operatorCodes
    return [collections.Counter(names[max(codes[op.opcodeIndex].builtinCode, codes[op.opcodeIndex].deprecatedBuiltinCode)]
                                for op in subgraph.operators) for subgraph in model.subgraphs]


def _dequantized_loop_state(bundle) -> list[int]:
    """The WHILE inputs that a DEQUANTIZE of a constant makes in the main graph."""
    from ai_edge_litert.tools import flatbuffer_utils
    from edgebuild_tflite.graph import OP, builtin, constant_data

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(bundle.read_bytes()))
    main = model.subgraphs[0]
    made_of_constant = {int(op.outputs[0]) for op in main.operators if builtin(model, op) == OP.DEQUANTIZE
                        and constant_data(model, main.tensors[int(op.inputs[0])]) is not None}
    return [int(t) for op in main.operators if builtin(model, op) == OP.WHILE
            for t in op.inputs if int(t) in made_of_constant]


def _convert(folder, source, kind):
    import torch

    from edgebuild_tflite.backend import TFLiteBackend

    namespace = {}
    exec(compile(source, "recurrent.py", "exec"), namespace)
    module, example = namespace["build"](kind)
    torch.export.save(torch.export.export(module, example), str(folder / "model.pt2"))
    TFLiteBackend().convert(folder / "model.pt2", folder / "fp32.tflite", {})
    return folder / "fp32.tflite", folder / "model.pt2"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    found = {kind: _convert(tmp_path_factory.mktemp(kind), RECURRENT, kind) for kind in ("gru", "lstm")}
    found["lstm-tagger"] = _convert(tmp_path_factory.mktemp("lstm-tagger"), SEQUENCE_OUT, "lstm")
    return found


def _compacted(fp32, name, roll_loops):
    from edgebuild_tflite.compaction import compact_file

    out = fp32.with_name(name)
    shutil.copy(fp32, out)
    compact_file(out, roll_loops)
    return out


def _samples(seed=0):
    rng = np.random.default_rng(seed)
    return (np.concatenate([rng.normal(scale=s, size=(8, STEPS, FEATURES)) for s in (0.1, 1, 5)]).astype(np.float32),)


def _close(expected, got):
    return all(np.allclose(expected[name], got[name], rtol=1e-5, atol=1e-6) for name in expected)


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_the_steps_of_an_unrolled_recurrent_net_ship_as_one_while_loop(converted, kind):
    from edgebuild_tflite.backend import TFLiteBackend

    fp32, _ = converted[kind]
    rolled, unrolled = _compacted(fp32, "rolled.tflite", True), _compacted(fp32, "unrolled.tflite", False)
    main, body, condition = _subgraphs(rolled)
    assert main["WHILE"] == 1 and condition == {"LESS": 1}
    # The body: one step (its gates cut by one SPLIT, its matmul) plus gathering its input and counting.
    assert body["GATHER"] == 1 and body["FULLY_CONNECTED"] == 1 and body["SPLIT"] >= 1 and body["ADD"] >= 2
    # Only the first steps stay outside, where the converter folded the zero state (a GRU's first
    # step; an LSTM's first two, zero h and then zero c): one TANH a GRU step, two an LSTM step.
    # The last runs in the loop: a GRU's h is state the next step reads; an LSTM's h reaches the
    # next step only through its matmul, so the loop carries it as a state of its own for the
    # head to read.
    assert main["TANH"] == {"gru": 1, "lstm": 4}[kind], main
    assert sum(main.values()) + sum(body.values()) + 1 < sum(_subgraphs(unrolled)[0].values())
    assert rolled.stat().st_size < unrolled.stat().st_size
    backend = TFLiteBackend()
    for seed in (0, 1):
        samples = _samples(seed)
        expected = backend.predict(fp32, samples).outputs
        assert _close(expected, backend.predict(rolled, samples).outputs)
        assert all(np.array_equal(expected[n], v) for n, v in backend.predict(unrolled, samples).outputs.items())
    # The same input, the same bytes.
    assert _compacted(fp32, "again.tflite", True).read_bytes() == rolled.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("net", ["lstm", "lstm-tagger"])
@pytest.mark.parametrize("technique", ["int8-weight-only", "int8-dynamic", "int8-static", "int4-weight-only", "int4-blockwise32"])
def test_quantized_candidates_roll_too_and_answer_as_their_unrolled_twin(converted, technique, net, tmp_path):
    """The loop body reads the same quantized weights. With int8 activations each step's tensors
    have scales calibrated of their own: no two steps are the same, nothing rolls (one scale per
    tensor is all a loop body has). `android: {loops: unrolled}` (the variant's options) keeps the
    steps. A tagger (every step an output) writes its steps into one block at every technique."""
    from edgebuild.api import CompressInput
    from edgebuild.plugins import default_registry
    from edgebuild_tflite.backend import TFLiteBackend

    fp32, program = converted[net]
    backend = TFLiteBackend()
    [chosen] = [t for t in default_registry().techniques_for("tflite") if t.name == technique]
    rng = np.random.default_rng(1)
    calibration = [(rng.normal(size=(1, STEPS, FEATURES)).astype(np.float32),) for _ in range(16)]
    bundles = {}
    for loops, options in (("rolled", {}), ("unrolled", {"loops": "unrolled"})):
        source = CompressInput(fp32_bundle=fp32, exported_program=program, calibration=calibration,
                               work_dir=tmp_path, options=options)
        bundles[loops] = tmp_path / f"{loops}.tflite"
        backend.compress(chosen, source, bundles[loops])
    assert len(_subgraphs(bundles["unrolled"])) == 1 and _ops(bundles["unrolled"])["WHILE"] == 0
    samples = _samples(2)
    expected = backend.predict(bundles["unrolled"], samples).outputs
    got = backend.predict(bundles["rolled"], samples).outputs
    if technique == "int8-static":
        assert len(_subgraphs(bundles["rolled"])) == 1
        assert all(np.array_equal(expected[name], got[name]) for name in expected)
        return
    assert _subgraphs(bundles["rolled"])[0]["WHILE"] == 1
    assert bundles["rolled"].stat().st_size < bundles["unrolled"].stat().st_size
    # Weights are dequantized inside the body (once, by the runtime), never carried as loop state.
    assert not _dequantized_loop_state(bundles["rolled"]), technique
    assert _subgraphs(bundles["rolled"])[1]["DYNAMIC_UPDATE_SLICE"] == (net == "lstm-tagger")
    if "weight-only" in technique:
        assert _subgraphs(bundles["rolled"])[1]["DEQUANTIZE"] >= 1
    for name, values in expected.items():
        assert np.max(np.abs(values - got[name])) <= 1e-3 * np.max(np.abs(values)), technique


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_a_net_that_outputs_every_step_writes_the_steps_into_one_block_inside_the_loop(tmp_path, kind):
    """Each step's output is concatenated after the loop (a sequence model, a CTC head): the body
    writes it into a block of the sequence (DYNAMIC_UPDATE_SLICE), and the concatenation reads
    the block in place of the steps' own tensors."""
    from edgebuild_tflite.backend import TFLiteBackend

    fp32, _ = _convert(tmp_path, SEQUENCE_OUT, kind)
    rolled, unrolled = _compacted(fp32, "rolled.tflite", True), _compacted(fp32, "unrolled.tflite", False)
    main, body, condition = _subgraphs(rolled)
    assert main["WHILE"] == 1 and main["FILL"] == 1 and body["DYNAMIC_UPDATE_SLICE"] == 1
    assert rolled.stat().st_size < unrolled.stat().st_size
    samples = _samples()
    backend = TFLiteBackend()
    expected, got = backend.predict(fp32, samples).outputs, backend.predict(rolled, samples).outputs
    assert _close(expected, got)


def test_both_directions_of_every_layer_roll_the_backward_steps_written_in_reverse(tmp_path):
    """A 2-layer bidirectional GRU: four loops. The backward direction reads its reversed input
    step by step and its outputs are concatenated last step first: the body writes step i at
    block position (last - i)."""
    from edgebuild_tflite.backend import TFLiteBackend

    fp32, _ = _convert(tmp_path, STACKED_BIDIRECTIONAL, "gru")
    rolled, unrolled = _compacted(fp32, "rolled.tflite", True), _compacted(fp32, "unrolled.tflite", False)
    graphs = _subgraphs(rolled)
    assert graphs[0]["WHILE"] == 4 and len(graphs) == 9
    assert all(body["DYNAMIC_UPDATE_SLICE"] == 1 for body in graphs[1::2])
    assert rolled.stat().st_size < unrolled.stat().st_size
    backend = TFLiteBackend()
    for seed in (0, 1):
        samples = _samples(seed)
        assert _close(backend.predict(fp32, samples).outputs, backend.predict(rolled, samples).outputs)


def test_only_the_first_step_stays_outside_and_gathers_its_piece_the_cut_goes(tmp_path):
    """24 steps. The first step (its zero state folded by the converter) stays outside the loop;
    the last one, which lacks the recurrent matmul only a next step would read, runs inside it
    (the loop computes that matmul once for nothing). The loop gathers its own pieces, so the
    UNPACK that cut the sequence is read only for the first step: one GATHER takes its place, and
    its 23 unread outputs go."""
    from edgebuild_tflite.backend import TFLiteBackend
    from test_fusion import _unused_tensors

    fp32, _ = _convert(tmp_path, SEQUENCE_OUT.replace("torch.randn(1, 6, 32)", "torch.randn(1, 24, 32)"), "gru")
    rolled = _compacted(fp32, "rolled.tflite", True)
    main = _subgraphs(rolled)[0]
    assert main["WHILE"] == 1 and main["UNPACK"] == 0 and main["GATHER"] == 1
    assert main["TANH"] == 1  # one step's candidate state outside: the first
    assert not _unused_tensors(rolled)
    samples = (np.random.default_rng(3).normal(size=(4, 24, FEATURES)).astype(np.float32),)
    backend = TFLiteBackend()
    assert _close(backend.predict(fp32, samples).outputs, backend.predict(rolled, samples).outputs)


def test_a_step_read_on_its_own_after_the_loop_keeps_the_steps_unrolled(tmp_path):
    """Step 2's output is also an output of the model: a tensor the loop cannot hand out, so no loop."""
    from edgebuild_tflite.backend import TFLiteBackend

    fp32, _ = _convert(tmp_path, ONE_STEP_ALSO, "gru")
    compacted = _compacted(fp32, "compacted.tflite", True)
    assert len(_subgraphs(compacted)) == 1 and _ops(compacted)["CONCATENATION"] == 1
    samples = _samples()
    backend = TFLiteBackend()
    expected, got = backend.predict(fp32, samples).outputs, backend.predict(compacted, samples).outputs
    assert all(np.array_equal(expected[name], got[name]) for name in expected)


def test_a_loop_that_answers_otherwise_is_not_kept(converted, monkeypatch):
    """compaction runs rolled and unrolled on random inputs; a loop that stops a step early ships
    nowhere: the candidate stays unrolled."""
    from edgebuild_tflite import loops

    roll = loops.roll

    def one_step_short(model):
        rolled = roll(model)
        condition = model.subgraphs[-1]
        limit = condition.tensors[int(condition.operators[0].inputs[1])]
        data = model.buffers[limit.buffer].data
        model.buffers[limit.buffer].data = np.frombuffer(
            (np.frombuffer(bytes(data), np.int32) - 1).astype(np.int32).tobytes(), np.uint8)
        return rolled

    monkeypatch.setattr(loops, "roll", one_step_short)
    fp32, _ = converted["gru"]
    kept = _compacted(fp32, "kept.tflite", True)
    assert len(_subgraphs(kept)) == 1 and _ops(kept)["WHILE"] == 0
    assert kept.read_bytes() == _compacted(fp32, "unrolled.tflite", False).read_bytes()


def test_a_loop_the_pass_cannot_build_leaves_the_steps_unrolled(converted, monkeypatch):
    """An error inside the loop pass (a graph it did not foresee) costs the loop, not the candidate."""
    from edgebuild_tflite import loops

    def broken(model):
        raise IndexError("a graph the pass did not foresee")

    monkeypatch.setattr(loops, "roll", broken)
    fp32, _ = converted["lstm"]
    kept = _compacted(fp32, "kept.tflite", True)
    assert kept.read_bytes() == _compacted(fp32, "unrolled.tflite", False).read_bytes()
