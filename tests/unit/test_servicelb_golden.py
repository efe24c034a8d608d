"""Golden scenarios for the servicelb model: Kubernetes YAML in, ``services`` rows out.

Each ``tests/unit/data/servicelb/*.txtar`` holds a description, optional ``config.yaml``
and ``allocations.yaml`` sections, the ``input.yaml`` manifests and the expected
``services.txt`` (`model.render` of the desired state: frontend rows with ids, slots,
backends and maglev summaries, derived slices, Service statuses, problems).
Regenerate with ``UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from ciliary import schema
from services.servicelb import allocator, model

DATA = Path(__file__).parent / "data" / "servicelb"
SCENARIOS = sorted(DATA.glob("*.txtar"))
EXPECTED = "services.txt"
_SECTION = re.compile(r"^-- (\S+) --$", re.M)


def parse_txtar(text: str) -> tuple[str, dict[str, str]]:
    parts = _SECTION.split(text)
    comment, sections = parts[0], {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        sections[name] = body.lstrip("\n")
    return comment, sections


def format_txtar(comment: str, sections: dict[str, str]) -> str:
    out = comment
    for name, body in sections.items():
        out += f"-- {name} --\n{body}"
        if not body.endswith("\n"):
            out += "\n"
    return out


def scenario(path: Path) -> tuple[model.Config, model.Allocations, list[dict[str, Any]]]:
    _, sections = parse_txtar(path.read_text())
    cfg = model.Config(**(yaml.safe_load(sections.get("config.yaml", "")) or {}))
    alloc = model.Allocations.create(cfg)
    preset = yaml.safe_load(sections.get("allocations.yaml", "")) or {}
    for pool in alloc.pools():
        entries = {
            allocator.parse_value(pool, str(token).replace(".", "-")): (owner, 1)
            for token, owner in (preset.get(pool.name) or {}).items()
        }
        pool.load(entries)  # type: ignore[arg-type]
    docs = [d for d in yaml.safe_load_all(sections["input.yaml"]) if d]
    return cfg, alloc, docs


def persist(alloc: model.Allocations) -> None:
    for pool in alloc.pools():
        for value in list(pool.pending):
            pool.persisted(value, 1)


def test_there_are_enough_scenarios() -> None:
    assert len(SCENARIOS) >= 12


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_golden(path: Path) -> None:
    cfg, alloc, docs = scenario(path)
    desired = model.compute(model.Inputs.from_manifests(docs), alloc, cfg)
    got = model.render(desired)
    comment, sections = parse_txtar(path.read_text())
    if os.environ.get("UPDATE_GOLDEN"):
        sections[EXPECTED] = got
        path.write_text(format_txtar(comment, sections))
    assert got == sections.get(EXPECTED), f"{path.name}: rerun with UPDATE_GOLDEN=1 and review"

    # rows survive the wire
    for fe in desired.frontends.values():
        assert schema.decode(schema.encode(fe), schema.LBFrontend) == fe

    # level-triggered: a second pass over the same inputs and allocations is identical
    persist(alloc)
    again = model.compute(model.Inputs.from_manifests(docs), alloc, cfg)
    assert model.render(again) == got
    assert not any(pool.pending for pool in alloc.pools())
    # nothing a live service uses is released after the pass
    used_ids = {fe.service_id for fe in again.frontends.values()}
    assert used_ids.isdisjoint(alloc.service_id.unused())


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_input_order_does_not_matter(path: Path) -> None:
    cfg, alloc, docs = scenario(path)
    expected = model.render(model.compute(model.Inputs.from_manifests(docs), alloc, cfg))
    for seed in range(3):
        cfg, alloc, docs = scenario(path)
        random.Random(seed).shuffle(docs)
        assert model.render(model.compute(model.Inputs.from_manifests(docs), alloc, cfg)) == expected
