"""JSON-lines flow export (Hubble's flow exporter): one ``GetFlowsResponse`` JSON per line.

Invariants:
- Only flows matching the allowlist (empty: all) and no denylist filter are written, in
  the exact line format of ``hubble observe -o jsonpb``.
- The file is rotated when a write would grow it past ``max_bytes``: ``path`` becomes
  ``path.1``, ``path.1`` becomes ``path.2`` … keeping ``backups`` old files.
- ``write_lines`` is blocking file I/O; the service calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ciliary import flowfilter, hubble, schema

ENV_EXPORT_FILE = "CILIARY_FLOWS_EXPORT_FILE"
ENV_EXPORT_MAX_MB = "CILIARY_FLOWS_EXPORT_MAX_MB"
ENV_EXPORT_BACKUPS = "CILIARY_FLOWS_EXPORT_BACKUPS"
ENV_EXPORT_ALLOWLIST = "CILIARY_FLOWS_EXPORT_ALLOWLIST"  # JSON list of FlowFilter
ENV_EXPORT_DENYLIST = "CILIARY_FLOWS_EXPORT_DENYLIST"


@dataclass
class ExportConfig:
    path: Path
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    allowlist: list[schema.FlowFilter] = field(default_factory=list)
    denylist: list[schema.FlowFilter] = field(default_factory=list)

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] = os.environ) -> ExportConfig | None:
        path = env.get(ENV_EXPORT_FILE, "")
        if not path:
            return None

        def filters(name: str) -> list[schema.FlowFilter]:
            text = env.get(name, "")
            if not text:
                return []
            found = msgspec.json.decode(text, type=list[schema.FlowFilter])
            flowfilter.validate(found)
            return found

        return cls(
            path=Path(path),
            max_bytes=int(float(env.get(ENV_EXPORT_MAX_MB, "10")) * 1024 * 1024),
            backups=int(env.get(ENV_EXPORT_BACKUPS, "5")),
            allowlist=filters(ENV_EXPORT_ALLOWLIST),
            denylist=filters(ENV_EXPORT_DENYLIST),
        )

    def lines(self, flows: Sequence[schema.Flow]) -> list[str]:
        return [
            hubble.format_jsonpb(f) + "\n"
            for f in flows
            if flowfilter.matches(f, self.allowlist, self.denylist)
        ]


def rotate(path: Path, backups: int) -> None:
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    for i in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{i}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{i + 1}"))
    if path.exists():
        path.replace(path.with_name(f"{path.name}.1"))


def write_lines(cfg: ExportConfig, lines: Sequence[str]) -> None:
    """Append lines, rotating first whenever the next line would exceed ``max_bytes``."""
    if not lines:
        return
    cfg.path.parent.mkdir(parents=True, exist_ok=True)
    size = cfg.path.stat().st_size if cfg.path.exists() else 0
    out = open(cfg.path, "a", encoding="utf-8")  # noqa: SIM115 - reopened on rotation
    try:
        for line in lines:
            n = len(line.encode())
            if size and size + n > cfg.max_bytes:
                out.close()
                rotate(cfg.path, cfg.backups)
                out = open(cfg.path, "a", encoding="utf-8")  # noqa: SIM115
                size = 0
            out.write(line)
            size += n
    finally:
        out.close()
