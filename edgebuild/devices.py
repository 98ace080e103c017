"""The device catalog: which phones a target may name, and what each one is."""
import difflib
from functools import cache
from importlib import resources

import yaml


@cache
def catalog() -> dict[str, dict]:
    """Device name -> its entry, with `platform` added ("android" or "ios")."""
    text = resources.files("edgebuild.catalog").joinpath("devices.yaml").read_text(encoding="utf-8")
    devices = {}
    for platform, entries in yaml.safe_load(text).items():
        for name, entry in entries.items():
            devices[name] = {"platform": platform, **entry}
    return devices


def closest(name: str, platform: str | None = None, n: int = 3) -> list[str]:
    names = [d for d, e in catalog().items() if platform is None or e["platform"] == platform]
    return difflib.get_close_matches(name, names, n=n, cutoff=0.5)
