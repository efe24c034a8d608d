"""Render deploy/values.yaml into the plain manifests under deploy/manifests/.

Invariants:
- The same values always give byte-identical files (fixed object and key order), so
  the checked-in manifests can be compared with a fresh render.
- ``render_files`` is pure (values in, file texts out); ``write`` replaces the directory's
  ``*.yaml`` files and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ciliary.deploy.manifests import render_objects
from ciliary.deploy.values import Values

HEADER = ("# Rendered by `python -m ciliary.deploy render` from deploy/values.yaml; do not edit.\n"
          "# Apply in file order: kubectl apply -f deploy/manifests/\n")


class _Dumper(yaml.SafeDumper):
    """Block style; long strings (the NATS configuration) as literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_files(values: Values) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, objects in render_objects(values).items():
        docs = [yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
                for obj in objects]
        out[name] = HEADER + "---\n" + "---\n".join(docs)
    return out


def write(files: dict[str, str], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.yaml"):
        if stale.name not in files:
            stale.unlink()
    written = []
    for name, text in files.items():
        path = directory / name
        path.write_text(text)
        written.append(path)
    return written


def differences(files: dict[str, str], directory: Path) -> list[str]:
    """Names of files that differ between a render and ``directory`` (missing, extra, changed)."""
    on_disk = {p.name: p.read_text() for p in directory.glob("*.yaml")} if directory.is_dir() else {}
    return sorted(name for name in set(files) | set(on_disk) if files.get(name) != on_disk.get(name))
