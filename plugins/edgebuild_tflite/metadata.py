"""TFLite Model Metadata, written with MediaPipe's metadata writers: general info, image inputs'
normalization and value range, and each labelled output's labels as an associated file. Android
Studio's ML Model Binding, MediaPipe Tasks and the TFLite Task Library read it; the runtime ignores
it, so a bundle's outputs are the same with and without it.

MediaPipe's wheel (`mediapipe==0.10.21`, the last with the compiled metadata module) pins numpy<2
and protobuf<5, which the rest of the toolchain has outgrown; it is installed without its
dependencies (`pip install --no-deps`), and only the metadata modules are imported: they need
flatbuffers and their own compiled helpers, none of OpenCV, JAX or protobuf that `import mediapipe`
pulls in.
"""
import importlib
import importlib.util
import io
import sys
import types
import zipfile
from pathlib import Path

import numpy as np

from edgebuild.api import ImageInput, ModelInterface, package_version

from .flatbuffer import pack

DISTRIBUTION = "mediapipe"
INSTALL = "pip install --no-deps mediapipe==0.10.21"
# Packages above the metadata modules whose __init__ imports OpenCV, JAX, protobuf and the tasks.
_BARE_PACKAGES = ("mediapipe", "mediapipe.tasks", "mediapipe.tasks.python")
# A fixed timestamp for the associated files' zip entries: the same inputs give the same bytes.
ZIP_TIME = (1980, 1, 1, 0, 0, 0)
METADATA_FIELD = "TFLITE_METADATA"


class MetadataUnavailable(RuntimeError):
    """MediaPipe's metadata writers cannot be imported here."""


def version() -> str:
    return f"mediapipe {package_version(DISTRIBUTION)} (metadata writers)"


def writers():
    """MediaPipe's metadata modules: (metadata, metadata_info, metadata_schema_py_generated, schema_py_generated)."""
    try:
        for name in _BARE_PACKAGES:
            if name not in sys.modules:
                spec = importlib.util.find_spec(name)
                if spec is None or not spec.submodule_search_locations:
                    raise ModuleNotFoundError(f"No module named {name!r}")
                package = types.ModuleType(name)
                package.__path__ = list(spec.submodule_search_locations)
                package.__spec__ = spec
                sys.modules[name] = package
        metadata = importlib.import_module("mediapipe.tasks.python.metadata.metadata")
        info = importlib.import_module("mediapipe.tasks.python.metadata.metadata_writers.metadata_info")
        metadata_fb = importlib.import_module("mediapipe.tasks.metadata.metadata_schema_py_generated")
        schema_fb = importlib.import_module("mediapipe.tasks.metadata.schema_py_generated")
    except Exception as exc:  # noqa: BLE001 - any import failure means the same thing here
        raise MetadataUnavailable(f"TFLite model metadata needs MediaPipe's metadata writers ({INSTALL}): "
                                  f"{type(exc).__name__}: {exc}") from exc
    return metadata, info, metadata_fb, schema_fb


def label_file_names(labels: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Output name -> the associated file holding its labels inside the bundle."""
    if len(labels) == 1:
        return {name: "labels.txt" for name in labels}
    return {name: f"labels_{name}.txt" for name in labels}


def _signature_order(maps, positions) -> list[str]:
    """Signature names in the order of the subgraph's input (or output) tensors."""
    by_index = {int(m.tensorIndex): _name(m) for m in maps}
    return [by_index.get(int(index), f"tensor {index}") for index in positions]


def write_metadata(bundle: Path, interface: ModelInterface, input_names: list[str]) -> None:
    """Rewrite `bundle` in place with TFLite Model Metadata describing `interface`.

    `input_names`: the model's input names in argument order (the signature calls them args_0, ...);
    outputs keep the model's names in the signature.
    """
    metadata, info, metadata_fb, _ = writers()
    import flatbuffers
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    model = flatbuffer.read_model(str(bundle))
    subgraph = model.subgraphs[0]
    signature = model.signatureDefs[0]
    positional = {f"args_{i}": name for i, name in enumerate(input_names)}
    inputs_in_order = [positional.get(name, name) for name in _signature_order(signature.inputs, subgraph.inputs)]
    output_names = _signature_order(signature.outputs, subgraph.outputs)
    labels = interface.labels_by_output(output_names)
    files = label_file_names(labels)

    def tensor(index):
        return subgraph.tensors[int(index)]

    inputs = []
    for name, index in zip(inputs_in_order, subgraph.inputs):
        image = interface.images.get(name)
        inputs.append(info.TensorMd(name=name, description=f"input {name!r}") if image is None
                      else _image_md(info, metadata_fb, name, image, tensor(index)))
    outputs = []
    for name, index in zip(output_names, subgraph.outputs):
        if name not in labels:
            outputs.append(info.TensorMd(name=name, description=f"output {name!r}"))
            continue
        # The metadata names a packed file by its name in the bundle.
        outputs.append(info.ClassificationTensorMd(
            name=name, description=f"scores of {len(labels[name])} classes, labels in {files[name]}",
            label_files=[info.LabelFileMd(files[name])], tensor_type=tensor(index).type))
    general = info.GeneralMd(name=interface.name, version=interface.version or None,
                             description=interface.description or None, author=interface.author or None,
                             licenses=interface.license or None)
    model_metadata = general.create_metadata()
    subgraph_metadata = metadata_fb.SubGraphMetadataT()
    subgraph_metadata.inputTensorMetadata = [md.create_metadata() for md in inputs]
    subgraph_metadata.outputTensorMetadata = [md.create_metadata() for md in outputs]
    model_metadata.subgraphMetadata = [subgraph_metadata]

    def packed() -> bytes:
        builder = flatbuffers.Builder(0)
        builder.Finish(model_metadata.Pack(builder), metadata.MetadataPopulator.METADATA_FILE_IDENTIFIER)
        return bytes(builder.Output())

    # As MediaPipe's populator does: record the oldest metadata parser that can read this.
    version_module = importlib.import_module("mediapipe.tasks.cc.metadata.python._pywrap_metadata_version")
    model_metadata.minParserVersion = version_module.GetMinimumMetadataParserVersion(packed())
    contents = {files[name]: ("\n".join(labels[name]) + "\n").encode("utf-8") for name in labels}
    bundle.write_bytes(_populated(bundle.read_bytes(), packed(), contents))


def copy_metadata(source: Path, bundle: Path) -> None:
    """Give `bundle` (a compression of `source`; the quantizer drops packed files) the metadata and
    associated files `source` carries; nothing when `source` has none."""
    metadata, *_ = writers()
    source_buffer = source.read_bytes()
    found = metadata.get_metadata_buffer(source_buffer)
    if not found:
        return
    contents = packed_files(source_buffer)
    model_buffer = bundle.read_bytes()
    if metadata.get_metadata_buffer(model_buffer) == found and not packed_files(model_buffer):
        # ai-edge-quantizer keeps the model's metadata entries: only the packed files are missing.
        # (Re-packing the model would cost bytes: ~700 B on the digits example's int4 bundle.)
        bundle.write_bytes(with_files(model_buffer, contents))
        return
    bundle.write_bytes(_populated(model_buffer, found, contents))


def _populated(model_buffer: bytes, metadata_buffer: bytes, files: dict[str, bytes]) -> bytes:
    """The model with `metadata_buffer` as its TFLITE_METADATA and `files` packed after it.

    MediaPipe's populator would re-pack the whole model with its own, older copy of the TFLite
    schema, which drops fields it does not know (blockwise quantization parameters, for one): the
    model is re-packed with ai-edge-litert's schema, the one ai-edge-quantizer writes with. Packed
    files get a fixed timestamp, so the same inputs give the same bytes.
    """
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(model_buffer))
    model.metadata = [m for m in model.metadata or [] if _name(m) != METADATA_FIELD]
    append_metadata(model, METADATA_FIELD, metadata_buffer)
    return with_files(pack(model), files)


def append_metadata(model, name: str, data: bytes) -> None:
    """Add a metadata entry `name` holding `data` (in a buffer of its own) to a ModelT."""
    from ai_edge_litert.tools import flatbuffer_utils

    model.buffers.append(flatbuffer_utils.BufferT())
    model.buffers[-1].data = np.frombuffer(data, dtype=np.uint8)
    entry = flatbuffer_utils.schema_fb.MetadataT()
    entry.name, entry.buffer = name, len(model.buffers) - 1
    model.metadata = [*(model.metadata or []), entry]


def with_files(model_buffer: bytes, files: dict[str, bytes]) -> bytes:
    """The model with `files` packed after it as a zip, the way TFLite metadata packs them."""
    if not files:
        return model_buffer
    out = io.BytesIO(model_buffer)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a") as archive:
        for name, content in files.items():
            archive.writestr(zipfile.ZipInfo(name, date_time=ZIP_TIME), content)
    return out.getvalue()


def _name(entry) -> str:
    return entry.name.decode() if isinstance(entry.name, bytes) else entry.name


def is_model_metadata(entry) -> bool:
    """Whether a model's metadata entry is the TFLite Model Metadata (others: the converter's own)."""
    return _name(entry) == METADATA_FIELD


def _image_md(info, metadata_fb, name: str, image: ImageInput, tensor):
    channels = image.channels([int(d) for d in tensor.shape])
    color = metadata_fb.ColorSpaceType.GRAYSCALE if channels == 1 else metadata_fb.ColorSpaceType.RGB
    mean, std = image.per_channel(channels)
    same_length = len(image.mean) == len(image.std)
    md = info.InputImageTensorMd(
        name=name, description=image.description or f"{'grayscale' if channels == 1 else 'RGB'} image, "
                                                   f"{image.layout}, pixels in [{image.range[0]:g}, {image.range[1]:g}]",
        # The schema wants as many means as stds: one each, or one per channel for both.
        norm_mean=list(image.mean) if same_length else mean,
        norm_std=list(image.std) if same_length else std,
        color_space_type=color, tensor_type=tensor.type)
    # The value range the model sees: the manifest's pixel range, normalized (MediaPipe assumes 0..255).
    md.min_values = [(image.range[0] - m) / s for m, s in zip(mean, std)]
    md.max_values = [(image.range[1] - m) / s for m, s in zip(mean, std)]
    return md


def packed_files(buffer: bytes) -> dict[str, bytes]:
    """Files packed after a model (labels): name -> content; {} when there are none."""
    try:
        with zipfile.ZipFile(io.BytesIO(buffer)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}


def associated_files(bundle: Path) -> dict[str, int]:
    """Files packed after the model (labels), with their sizes in the zip; {} when there are none."""
    try:
        with zipfile.ZipFile(bundle) as archive:
            return {entry.filename: entry.compress_size for entry in archive.infolist()}
    except zipfile.BadZipFile:
        return {}


def tensor_interface(bundle: Path) -> dict[str, dict]:
    """Signature name -> what the metadata says of that tensor (its metadata name, description,
    normalization, labels and their file), for the packager's generated code; {} without metadata."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as flatbuffer

    model = flatbuffer.read_model(str(bundle))
    if not any(is_model_metadata(m) for m in model.metadata or []):
        return {}
    found = read_back(bundle)
    subgraph, signature = model.subgraphs[0], model.signatureDefs[0]
    described = found["metadata"]["subgraph_metadata"][0]
    result = {}
    for maps, positions, key in ((signature.inputs, subgraph.inputs, "input_tensor_metadata"),
                                 (signature.outputs, subgraph.outputs, "output_tensor_metadata")):
        for name, tensor in zip(_signature_order(maps, positions), described.get(key, [])):
            entry = {"metadata_name": tensor.get("name", name), "description": tensor.get("description", "")}
            for unit in tensor.get("process_units", []):
                if unit.get("options_type") == "NormalizationOptions":
                    entry["normalization"] = {"mean": unit["options"]["mean"], "std": unit["options"]["std"]}
            for file in tensor.get("associated_files", []):
                if file.get("type") == "TENSOR_AXIS_LABELS" and file["name"] in found["files"]:
                    entry["labels_file"] = file["name"]
                    entry["labels"] = found["files"][file["name"]].splitlines()
            result[name] = entry
    return result


def read_back(bundle: Path) -> dict:
    """The metadata as JSON and the associated files' contents, read with MediaPipe's displayer."""
    import json

    metadata, *_ = writers()
    displayer = metadata.MetadataDisplayer.with_model_file(str(bundle))
    return {"metadata": json.loads(displayer.get_metadata_json()),
            "files": {name: displayer.get_associated_file_buffer(name).decode("utf-8")
                      for name in displayer.get_packed_associated_file_list()}}
