"""Evaluation and calibration data of any size: a folder of .npz shards, read a shard at a time
(issue #18). The build's numbers and bundles are those of the same data in one file."""
import json
import threading

import numpy as np
import pytest

from conftest import example_manifest, make_project, run_edgebuild
from edgebuild.data import ShardedArray, load_dataset, padded_batches
from edgebuild.errors import InputError

INPUTS = [{"name": "x", "shape": [1, 1, 8, 8], "dtype": "float32"}]


def _shards(folder, bounds, *, labels=True, dtype=np.float64):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    total = bounds[-1]
    x = rng.random((total, 1, 8, 8)).astype(dtype)
    y = rng.integers(0, 10, total)
    for index, (begin, end) in enumerate(zip(bounds, bounds[1:])):
        arrays = {"x": x[begin:end]}
        if labels:
            arrays["y"] = y[begin:end]
        np.savez(folder / f"part-{index:03d}.npz", **arrays)
    return x.astype(np.float32), y


def test_a_sharded_input_reads_like_the_whole_array_and_holds_one_shard_per_thread(tmp_path):
    x, y = _shards(tmp_path / "data", [0, 7, 8, 30, 31, 50])
    data = load_dataset(tmp_path / "data", "data", INPUTS, need_labels=True)
    (array,) = data.inputs
    assert isinstance(array, ShardedArray)
    assert len(data) == 50 and array.shape == (50, 1, 8, 8) and array.dtype == np.float32
    assert np.array_equal(np.asarray(array), x) and np.array_equal(data.labels["y"], y)
    for begin, end in [(0, 7), (5, 9), (7, 8), (29, 50), (49, 50), (10, 10), (0, 50)]:
        view = array[begin:end]
        assert isinstance(view, ShardedArray) and len(view) == end - begin
        assert np.array_equal(np.asarray(view), x[begin:end])
        assert np.array_equal(np.asarray(view[1:3]), x[begin:end][1:3])
    assert np.array_equal(array[31], x[31]) and np.array_equal(array[-1], x[-1])
    assert np.array_equal(array[[3, 40]], x[[3, 40]])
    assert np.array_equal(np.concatenate([array[:4]] * 2), np.concatenate([x[:4]] * 2))
    # Batches in order, as a runtime's predict reads them: one shard held at a time.
    held = []
    for chunk, rows in padded_batches((array,), 4):
        held.append(len(array.cache.loaded))
        assert chunk[0].shape == (4, 1, 8, 8)
    assert max(held) == 1
    # Each thread keeps its own shard: another thread reading the last shard leaves this one's alone.
    np.asarray(array[:2])
    assert {name: index for name, (index, _) in array.cache.loaded.items()} == {"x": 0}
    seen = {}

    def read_last():
        seen["rows"] = np.asarray(array[45:47])
        seen["held"] = {name: index for name, (index, _) in array.cache.loaded.items()}

    thread = threading.Thread(target=read_last)
    thread.start()
    thread.join()
    assert np.array_equal(seen["rows"], x[45:47]) and seen["held"] == {"x": 4}
    assert {name: index for name, (index, _) in array.cache.loaded.items()} == {"x": 0}
    assert [len(s) for s in data.samples(3)] == [1, 1, 1] and np.array_equal(data.samples(3)[2][0], x[2:3])


def test_a_bad_shard_is_named_in_the_error(tmp_path):
    _shards(tmp_path / "data", [0, 5, 10])
    np.savez(tmp_path / "data" / "part-001.npz", x=np.zeros((5, 1, 4, 4), np.float32), y=np.zeros(5, np.int64))
    with pytest.raises(InputError) as raised:
        load_dataset(tmp_path / "data", "data", INPUTS, need_labels=True)
    assert str(raised.value) == "data/part-001.npz: array 'x' has shape (5, 1, 4, 4); model input 'x' takes (N, 1, 8, 8)"
    np.savez(tmp_path / "data" / "part-001.npz", x=np.zeros((5, 1, 8, 8), np.float32))
    with pytest.raises(InputError) as raised:
        load_dataset(tmp_path / "data", "data", INPUTS, need_labels=True)
    assert str(raised.value) == "data/part-001.npz: missing array 'y' (labels) needed by the metric"


def test_a_folder_without_shards_is_refused_with_its_location(tmp_path):
    manifest = example_manifest()
    manifest["data"]["evaluation"] = "empty"
    make_project(tmp_path, manifest)
    (tmp_path / "empty").mkdir()
    done = run_edgebuild("validate", cwd=tmp_path)
    assert done.returncode == 2
    line = next(i for i, text in enumerate((tmp_path / "edgebuild.yaml").read_text().splitlines(), 1)
                if "evaluation: empty" in text)
    assert done.stderr.strip().splitlines()[-1] == f"edgebuild.yaml:{line}:15: data.evaluation: folder 'empty' holds no .npz shards"


@pytest.mark.slow
def test_the_example_evaluated_on_shards_gives_the_single_files_numbers_and_bundles(built_example, tmp_path):
    manifest = example_manifest()
    manifest["data"]["evaluation"] = "examples/digits/eval-shards"
    make_project(tmp_path, manifest)
    with np.load(tmp_path / "examples" / "digits" / "eval.npz") as whole:
        x, y = whole["x"], whole["y"]
    folder = tmp_path / "examples" / "digits" / "eval-shards"
    folder.mkdir()
    bounds = [0, 100, 101, 250, len(x)]  # uneven, and not whole batches
    for index, (begin, end) in enumerate(zip(bounds, bounds[1:])):
        np.savez(folder / f"part-{index}.npz", x=x[begin:end], y=y[begin:end])
    done = run_edgebuild("build", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr

    def numbers(project):
        report = json.loads((project / "dist" / "report.json").read_text())
        return [{(c["technique"], json.dumps(c.get("metrics"), sort_keys=True), c.get("bytes"))
                 for c in target["candidates"]} for target in report["targets"]]

    assert numbers(tmp_path) == numbers(built_example)
    for name in ("android/digits.tflite", "ios/digits.json"):
        assert (tmp_path / "dist" / name).read_bytes() == (built_example / "dist" / name).read_bytes()
    # Every shard is an input of the build: the lock lists it, and editing one reruns the evaluations.
    lock = json.loads((tmp_path / "edgebuild.lock").read_text())
    assert {f"examples/digits/eval-shards/part-{i}.npz" for i in range(4)} <= set(lock["targets"]["android"]["inputs"])
    np.savez(folder / "part-3.npz", x=x[250:][::-1], y=y[250:][::-1])
    again = run_edgebuild("build", "--json", "--platform", "android", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "evaluate:tflite:int8-weight-only" in json.loads(again.stdout)["executed"]


def test_a_pattern_names_shards_like_a_folder_and_a_bad_one_is_refused_with_its_location(tmp_path):
    x, y = _shards(tmp_path / "data", [0, 7, 20])
    (tmp_path / "data" / "notes.txt").write_text("not a shard")
    data = load_dataset(tmp_path / "data" / "part-*.npz", "data/part-*.npz", INPUTS, need_labels=True)
    assert np.array_equal(np.asarray(data.inputs[0]), x) and np.array_equal(data.labels["y"], y)
    from edgebuild.data import data_sha256

    assert data_sha256(tmp_path / "data" / "part-*.npz") == data_sha256(tmp_path / "data")

    manifest = example_manifest()
    for value, message in [("examples/digits/none-*.npz", "pattern 'examples/digits/none-*.npz' matches no .npz shards"),
                           ("examples/digits/*.txt", "pattern 'examples/digits/*.txt' matches labels.txt, which is not a .npz file")]:
        manifest["data"]["evaluation"] = value
        project = tmp_path / value.replace("/", "_").replace("*", "star")
        make_project(project, manifest)
        done = run_edgebuild("validate", cwd=project)
        assert done.returncode == 2
        assert done.stderr.strip().splitlines()[-1].endswith(f":15: data.evaluation: {message}"), done.stderr
