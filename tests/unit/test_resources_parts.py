"""A large text loaded in parts on several processes loads exactly as it does in one piece:
the same resources in the same order, the same problems at the same places."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.resources import ManifestError, load_manifests, loader, yamlio
from ciliary.resources.documents import split_documents


def test_cuts_only_at_document_starts_and_keeps_every_character() -> None:
    text = "a: 1\n---\nb: |\n  --- not a marker\n---x: 2\n--- c\n---\td\n---\n"
    parts = split_documents(text, 10)
    assert "".join(parts) == text
    assert parts[0] == "a: 1\n"
    assert all(part.startswith("---") and part[3] in " \t\n" for part in parts[1:])
    assert split_documents(text, 1) == [text]
    assert split_documents("%YAML 1.1\n---\na: 1\n---\nb: 2\n", 2) == ["%YAML 1.1\n---\na: 1\n---\nb: 2\n"]
    assert split_documents("no markers: here\n", 4) == ["no markers: here\n"]
    many = "---\n".join(f"k: {i}\n" for i in range(1000))
    first, second = split_documents(many, 2, first_share=0.25)
    assert first + second == many and 0.2 < len(first) / len(many) < 0.3


@settings(max_examples=200, deadline=None)
@given(docs=st.lists(st.recursive(st.one_of(st.none(), st.integers(), st.text(max_size=6)),
                                  lambda inner: st.dictionaries(st.text(max_size=4), inner, max_size=3),
                                  max_leaves=6), max_size=8),
       parts=st.integers(1, 5), explicit=st.booleans(), flow=st.sampled_from([None, True, False]))
def test_parts_parse_to_the_documents_of_the_whole(docs: list, parts: int, explicit: bool,
                                                   flow: bool | None) -> None:
    text = yaml.safe_dump_all(docs, explicit_start=explicit, default_flow_style=flow)
    whole = yamlio.parse(text, json_input=False)
    pieces = [yamlio.parse(part, json_input=False) for part in split_documents(text, parts)]
    assert [d for docs_, _ in pieces for d in docs_] == whole[0]
    assert all(problem is None for _, problem in pieces) and whole[1] is None


def service(i: int, port: int | str = 80) -> str:
    return (f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i:05d}, namespace: bench}}\n"
            f"spec:\n  ports:\n  - {{port: {port}}}\n")


def big_file(tmp_path: Path, docs: list[str]) -> str:
    path = tmp_path / "big.yaml"
    path.write_text("---\n".join(docs))
    assert len(path.read_text()) >= loader.PARALLEL_MIN_CHARS
    return str(path)


def problems(path: str, workers: int) -> list[str]:
    with pytest.raises(ManifestError) as caught:
        load_manifests([path], workers=workers)
    return [str(p) for p in caught.value.problems]


def test_a_large_file_loads_in_parts_as_in_one_piece(tmp_path: Path) -> None:
    docs = ["apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n", ""]
    docs += [service(i) for i in range(4000)]
    docs.insert(3000, "apiVersion: v1\nkind: ServiceList\nitems:\n- metadata: {name: listed}\n"
                      "  spec: {ports: [{port: 1}]}\n")
    path = big_file(tmp_path, docs)
    whole = load_manifests([path], workers=1)
    here: list[int] = []
    part = loader._load_part

    def load_part_here(text: str, source: str) -> loader._Part:
        here.append(len(text))
        return part(text, source)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader.threading, "active_count", lambda: 1)  # a process without threads
        patch.setattr(loader, "_load_part", load_part_here)
        patch.setattr(loader, "_load_text", None)  # never the one-piece path
        assert load_manifests([path], workers=3) == whole
    assert len(here) == 1 and here[0] < len(Path(path).read_text()) / 2, "the others were forked"

    def no_parts(text: str, source: str) -> loader._Part:
        raise AssertionError("a process with threads is not forked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader.threading, "active_count", lambda: 2)
        patch.setattr(loader, "_load_part", no_parts)
        assert load_manifests([path], workers=3) == whole


def test_problems_in_several_parts_are_placed_as_in_one_piece(tmp_path: Path) -> None:
    docs = [service(i, port=0 if i in (5, 3990) else 80) for i in range(4000)]
    docs[3995] = service(7)  # a duplicate of a document in the first part
    path = big_file(tmp_path, docs)
    found = problems(path, workers=2)
    assert found == problems(path, workers=1)
    assert len(found) == 3 and "document 3990" in found[1] and "document 3995" in found[2]


def test_a_syntax_error_in_a_later_part_is_reported_as_in_one_piece(tmp_path: Path) -> None:
    docs = [service(i) for i in range(4000)]
    docs[3500] = "apiVersion: v1\nkind: [Service\n"
    docs[100] = service(100, port="-1")
    path = big_file(tmp_path, docs)
    found = problems(path, workers=2)
    assert found == problems(path, workers=1)
    assert "document 3500: line" in found[-1]
