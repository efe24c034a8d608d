"""busmigration: which store holds an instance's state, and which stores a change removes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ciliary import busmigration as M


def test_a_new_data_directory_needs_no_migration(tmp_path: Path) -> None:
    assert M.recorded_replicas(tmp_path) is None
    assert M.migration_from(tmp_path, 3) is None


def test_a_data_directory_of_before_the_marker_is_a_single_server_one(tmp_path: Path) -> None:
    (tmp_path / "nats" / "jetstream").mkdir(parents=True)
    assert M.recorded_replicas(tmp_path) == 1
    assert M.migration_from(tmp_path, 1) is None
    assert M.migration_from(tmp_path, 3) == 1


def test_the_marker_names_the_current_store(tmp_path: Path) -> None:
    (tmp_path / "nats" / "jetstream").mkdir(parents=True)  # stale: the marker says 3
    M.record(tmp_path, 3)
    assert M.migration_from(tmp_path, 3) is None
    assert M.migration_from(tmp_path, 1) == 3
    assert M.migration_from(tmp_path, 5) == 3


def test_an_unreadable_marker_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / M.MARKER).write_text('{"replicas": "three"}')
    with pytest.raises(RuntimeError, match=r"bus\.json is unreadable"):
        M.recorded_replicas(tmp_path)


def test_stores_shared_with_the_new_shape_are_kept(tmp_path: Path) -> None:
    for path in [*M.store_dirs(tmp_path, 5), *M.store_dirs(tmp_path, 1)]:
        path.mkdir(parents=True)
    M.remove_stores(tmp_path, 5, keep=3)
    assert [p.exists() for p in M.store_dirs(tmp_path, 5)] == [True, True, True, False, False]
    M.remove_stores(tmp_path, 1, keep=3)
    assert not (tmp_path / "nats").exists()
    M.remove_stores(tmp_path, 3, keep=1)
    assert not any(p.exists() for p in M.store_dirs(tmp_path, 5))
