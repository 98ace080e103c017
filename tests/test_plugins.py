"""Plugins: built-ins load through entry points exactly like third-party packages."""
import json

import pluggy
import pytest

from edgebuild import hookspecs
from edgebuild.api import Metric, Technique
from edgebuild.hookspecs import hookimpl
from edgebuild.plugins import PluginError, collect, make_plugin_manager
from tests.conftest import read_report, run_edgebuild

BUILT_INS = {"loaders", "metrics", "tflite", "reports"}


def test_built_in_plugins_come_from_entry_points():
    pm = make_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert BUILT_INS <= names
    distributions = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
    assert "edgebuild" in distributions


def test_nothing_registers_without_entry_points():
    registry = collect(make_plugin_manager(load_entry_points=False))
    assert not registry.backends and not registry.metrics and not registry.loaders


def test_hookspecs_have_one_line_docstrings():
    specs = [getattr(hookspecs, n) for n in dir(hookspecs) if n.startswith("register_")]
    assert len(specs) >= 6
    for spec in specs:
        assert spec.__doc__ and "\n" not in spec.__doc__.strip()


class ThirdParty:
    @hookimpl
    def register_metrics(self, register):
        register(Metric("always-half", "a constant", lambda outputs, reference, labels: 0.5))

    @hookimpl
    def register_techniques(self, register):
        register(Technique("fp32", "tflite", "a replacement fp32"), replace=True)


def test_later_plugins_add_and_override_only_when_they_say_so():
    pm = make_plugin_manager()
    pm.register(ThirdParty(), name="third-party")
    registry = collect(pm)
    assert registry.metrics["always-half"].compute(None, None, None) == 0.5
    assert registry.techniques[("tflite", "fp32")].description == "a replacement fp32"
    assert registry.origin[("technique", "tflite/fp32")] == "third-party"
    assert registry.replaced == {("technique", "tflite/fp32"): "tflite"}
    assert registry.origin[("technique", "tflite/fp16")] == "tflite"


def test_a_replacement_loaded_before_the_built_ins_still_replaces():
    """Entry points load in sys.path order: a package found before edgebuild's own still registers
    after the built-ins, so its replace=True replaces instead of being refused."""
    pm = make_plugin_manager(load_entry_points=False)
    pm.register(ThirdParty(), name="third-party")
    pm.load_setuptools_entrypoints("edgebuild")
    registry = collect(pm)
    assert registry.techniques[("tflite", "fp32")].description == "a replacement fp32"
    assert registry.replaced == {("technique", "tflite/fp32"): "tflite"}


class Shadowing:
    @hookimpl
    def register_metrics(self, register):
        register(Metric("top1", "not the built-in top1", lambda outputs, reference, labels: 1.0))


def test_a_plugin_never_silently_replaces_a_built_in_name():
    pm = make_plugin_manager()
    pm.register(Shadowing(), name="shadowing")
    with pytest.raises(PluginError) as raised:
        collect(pm)
    message = str(raised.value)
    assert message.startswith("plugin 'shadowing': registers metric 'top1', which plugin 'metrics' already "
                              "registered; pass replace=True")
    assert raised.value.exit_code == 2


class NotABackend:
    name, platform = "half", "android"

    def version(self):
        return "1"


class RegistersHalfABackend:
    @hookimpl
    def register_backends(self, register):
        register(NotABackend())


def test_a_backend_missing_protocol_methods_is_refused_naming_them():
    pm = make_plugin_manager()
    pm.register(RegistersHalfABackend(), name="half")
    with pytest.raises(PluginError, match=r"must be an edgebuild.api.Backend, got NotABackend \(missing: compress, "
                                          r"convert, describe, extension, predict, skip_reason, variant, weights\)"):
        collect(pm)


def test_unknown_hook_is_rejected():
    pm = make_plugin_manager(load_entry_points=False)

    class Bad:
        @hookimpl
        def register_widgets(self, register):
            pass

    pm.register(Bad())
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()


PLUGIN = '''
from edgebuild.api import Technique
from edgebuild.hookspecs import hookimpl

@hookimpl
def register_techniques(register):
    register(Technique(
        name="int8-weight-only-tensorwise", backend="tflite",
        description="third-party: int8 per-tensor weights dequantized at load, float32 compute",
        recipe=[{"regex": ".*", "operation": "*", "algorithm_key": "min_max_uniform_quantize",
                 "op_config": {"weight_tensor_config": {"num_bits": 8, "symmetric": True,
                               "granularity": "TENSORWISE", "dtype": "INT"},
                               "compute_precision": "FLOAT", "explicit_dequantize": True}}]))
'''


def install_fake_distribution(site, name="edgebuild_extra", source=PLUGIN):
    """A plugin package with a dist-info, found by importlib.metadata like any pip-installed one."""
    (site / f"{name}.py").write_text(source)
    info = site / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[edgebuild]\nextra = {name}\n")


@pytest.mark.slow
def test_third_party_package_plugs_in_like_built_ins(built_copy, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    install_fake_distribution(site)
    env = {"PYTHONPATH": str(site)}
    listing = run_edgebuild("plugins", "--json", cwd=built_copy, env=env)
    assert listing.returncode == 0, listing.stderr
    extra = next(p for p in json.loads(listing.stdout) if p["name"] == "extra")
    assert extra["distribution"] == "edgebuild_extra 1.0"
    assert extra["provides"] == ["technique tflite/int8-weight-only-tensorwise"]

    result = run_edgebuild("build", "--json", cwd=built_copy, env=env)
    assert result.returncode == 0, result.stderr
    # Only the new technique's work runs; built-in candidates stay cached.
    assert set(json.loads(result.stdout)["executed"]) == {
        "compress:tflite:int8-weight-only-tensorwise", "evaluate:tflite:int8-weight-only-tensorwise",
        "select:android", "package:android", "report"}
    candidate = next(c for c in read_report(built_copy)["targets"][0]["candidates"]
                     if c["technique"] == "int8-weight-only-tensorwise")
    # Built, run in ai-edge-litert and judged like any built-in candidate.
    assert candidate["status"] in ("pass", "fail") and 30_000 < candidate["bytes"] < 60_000
    assert candidate["latency_ms"] > 0
    # Its metric is the bundle's own top-1, recomputed here from its outputs in ai-edge-litert.
    import numpy as np

    from edgebuild_tflite.backend import TFLiteBackend

    bundle = built_copy / ".edgebuild" / "tflite" / "candidates" / "int8-weight-only-tensorwise.tflite"
    assert bundle.stat().st_size == candidate["bytes"]
    data = np.load(built_copy / "examples" / "digits" / "eval.npz")
    outputs = TFLiteBackend().predict(bundle, [data["x"]]).outputs
    logits = outputs[0] if isinstance(outputs, list) else next(iter(outputs.values()))
    assert candidate["metric"] == float(np.mean(np.asarray(logits).argmax(-1) == data["y"]))
