"""The device catalog: which phones a target may name, and what each one is."""
import difflib
from functools import cache
from importlib import resources

import yaml

from .units import parse_size


@cache
def catalog() -> dict[str, dict]:
    """Device name -> its entry, with `platform` added ("android" or "ios")."""
    devices = {}
    for platform, entries in _data().items():
        if platform == "stores":
            continue
        for name, entry in entries.items():
            devices[name] = {"platform": platform, **entry}
    return devices


@cache
def _data() -> dict:
    text = resources.files("edgebuild.catalog").joinpath("devices.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def store_for(platform: str) -> tuple[str, dict[str, int]] | None:
    """(store name, {delivery: byte limit}) for a platform's app store, if the catalog has one."""
    for name, store in _data()["stores"].items():
        if store["platform"] == platform:
            return name, {delivery: parse_size(limit) for delivery, limit in store["limits"].items()}
    return None


def closest(name: str, platform: str | None = None, n: int = 3) -> list[str]:
    names = [d for d, e in catalog().items() if platform is None or e["platform"] == platform]
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)
