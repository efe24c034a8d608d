"""The schema package: every domain module's public names reach ``schema.<Name>`` once,
and the identity numbering is self-consistent."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil

import pytest

from ciliary import schema

MODULES = sorted(info.name for info in pkgutil.iter_modules(schema.__path__))


def _defined_names(module_name: str) -> set[str]:
    """Public names a module defines at top level (classes, functions, constants)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(f"ciliary.schema.{module_name}")))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_") and n not in ("T", "__all__")}


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_exported(module_name: str) -> None:
    module = importlib.import_module(f"ciliary.schema.{module_name}")
    assert set(module.__all__) == _defined_names(module_name)
    for name in module.__all__:
        assert getattr(schema, name) is getattr(module, name)


def test_no_name_is_defined_twice() -> None:
    seen: dict[str, str] = {}
    for module_name in MODULES:
        for name in importlib.import_module(f"ciliary.schema.{module_name}").__all__:
            assert name not in seen, f"{name} in {seen.get(name)} and {module_name}"
            seen[name] = module_name


def test_reserved_identity_constants_match_the_table() -> None:
    by_constant = {
        getattr(schema, f"IDENTITY_{name.upper().replace('-', '_')}"): name
        for name in schema.RESERVED_IDENTITIES.values()
    }
    assert by_constant == schema.RESERVED_IDENTITIES
    assert schema.RESERVED_IDENTITY_IDS == {n: i for i, n in schema.RESERVED_IDENTITIES.items()}
    assert sorted(schema.RESERVED_IDENTITIES) == list(range(1, 12))


def test_identity_bit_layout() -> None:
    assert schema.identity_cluster_id((5 << 16) | 300) == 5
    assert schema.identity_cluster_id(schema.IDENTITY_WORLD) == 0
    assert schema.identity_cluster_id(schema.IDENTITY_LOCAL_FLAG | (5 << 16)) == 0
    assert schema.is_local_identity(schema.IDENTITY_LOCAL_MIN)
    assert not schema.is_local_identity(schema.identity_cluster_range(255)[1])
    assert schema.describe_identity(2) == "reserved:world"
    assert schema.describe_identity((1 << 16) | 7) == "cluster 1 #7"
    assert schema.describe_identity(schema.IDENTITY_LOCAL_FLAG | 3) == "local 3"
