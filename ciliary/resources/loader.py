"""Loading manifests from files, directories and stdin into validated `Resource`s.

Invariants:
- All-or-nothing: every input is read, parsed, decoded and validated first; if anything is
  wrong, one `ManifestError` lists every problem and no resource is returned.
- Paths: a file (``.yaml``/``.yml``/``.json``), a directory (its such files, sorted,
  non-recursive) or ``-`` (stdin, reported as ``<stdin>``).
- Empty documents are skipped but still counted, so ``document N`` is the N-th
  (0-based) ``---`` section of the file. ``kind: List`` (and ``<Kind>List``) is expanded;
  its items are reported as ``document N, item M``.
- Namespaced objects get ``metadata.namespace: default`` when unset; cluster-scoped objects
  lose any ``metadata.namespace``. The original input is never mutated.
- Two objects with the same key in one load are an error.
"""

from __future__ import annotations

import copy
import os
import sys
import threading
from typing import Any, NamedTuple, TextIO

import msgspec

from . import documents, yamlio
from .decoding import convert
from .errors import ManifestError, Problem
from .kinds import DEFAULT_NAMESPACE, KINDS, Resource
from .validate import validate

STDIN = "-"
PARALLEL_MIN_CHARS = 256 * 1024  # smallest text `load_manifests(workers > 1)` loads in parts
OWN_PART_SHARE = 0.95  # the calling process's part, relative to a forked worker's
STDIN_SOURCE = "<stdin>"
SUFFIXES = (".yaml", ".yml", ".json")


class _Place:
    """Where an object came from, for building `Problem`s."""

    def __init__(self, source: str, document: int, item: int | None = None) -> None:
        self.source, self.document, self.item = source, document, item

    def problem(self, message: str, *, field: str = "", kind: str = "", namespace: str = "",
                name: str = "", line: int | None = None, column: int | None = None) -> Problem:
        return Problem(source=self.source, document=self.document, item=self.item, kind=kind,
                       namespace=namespace, name=name, field=field, message=message,
                       line=line, column=column)

    def describe(self) -> str:
        text = f"{self.source} document {self.document}"
        return text if self.item is None else f"{text} item {self.item}"


def load_manifests(
    paths: list[str], stdin: TextIO | None = None, *, workers: int = 1
) -> list[Resource]:
    """Validated resources from `paths`, in input order; raises `ManifestError`.

    With ``workers > 1`` a YAML text of ``PARALLEL_MIN_CHARS`` or more is parsed and
    validated in that many parts at once (forked processes), with the same result."""
    if isinstance(paths, str):
        paths = [paths]
    problems: list[Problem] = []
    resources: list[Resource] = []
    for source, text in _read_inputs(paths, stdin, problems):
        json_input = None if source == STDIN_SOURCE else source.endswith(".json")
        if workers > 1 and len(text) >= PARALLEL_MIN_CHARS and not json_input and not (
                json_input is None and text.lstrip().startswith("{")):
            resources.extend(_load_yaml_in_parts(text, source, problems, workers))
        else:
            resources.extend(_load_text(text, source, json_input, problems))
    _check_duplicates(resources, problems)
    if problems:
        raise ManifestError(problems)
    return [resource for resource, _ in resources]


def loads(text: str, source: str = "<string>") -> list[Resource]:
    """Validated resources from YAML or JSON text; raises `ManifestError`."""
    problems: list[Problem] = []
    resources = _load_text(text, source, None, problems)
    _check_duplicates(resources, problems)
    if problems:
        raise ManifestError(problems)
    return [resource for resource, _ in resources]


def resource_from_manifest(manifest: Any, source: str = "<object>") -> Resource:
    """One validated resource from an already-parsed object (e.g. from the Kubernetes API)."""
    problems: list[Problem] = []
    resource = _load_object(manifest, _Place(source, 0), problems)
    if problems or resource is None:
        raise ManifestError(problems)
    return resource


def _read_inputs(
    paths: list[str], stdin: TextIO | None, problems: list[Problem]
) -> list[tuple[str, str]]:
    inputs: list[tuple[str, str]] = []
    for path in paths:
        if path == STDIN:
            inputs.append((STDIN_SOURCE, (stdin or sys.stdin).read()))
            continue
        if os.path.isdir(path):
            files = sorted(
                os.path.join(path, n) for n in os.listdir(path) if n.endswith(SUFFIXES)
            )
        else:
            files = [path]
        for file in files:
            if "\x00" in file:  # no file system path holds one (open() raises ValueError)
                problems.append(Problem(source=file.replace("\x00", "\\x00"),
                                        message="cannot read: the path contains a NUL byte"))
                continue
            try:
                with open(file, encoding="utf-8") as fh:
                    inputs.append((file, fh.read()))
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                problems.append(Problem(source=file, message=f"cannot read: {reason}"))
    return inputs


def _load_text(
    text: str, source: str, json_input: bool | None, problems: list[Problem]
) -> list[tuple[Resource, _Place]]:
    docs, syntax = yamlio.parse(text, json_input=json_input)
    out = _load_documents(docs, source, problems)
    if syntax is not None:
        problems.append(_Place(source, syntax.document).problem(
            syntax.message, line=syntax.line, column=syntax.column))
    return out


def _load_documents(docs: list[Any], source: str, problems: list[Problem]) -> list[tuple[Resource, _Place]]:
    out: list[tuple[Resource, _Place]] = []
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        for place, obj in _expand(doc, _Place(source, index), problems):
            resource = _load_object(obj, place, problems)
            if resource is not None:
                out.append((resource, place))
    return out


class _Part(NamedTuple):
    """What one part of a text loaded to: its document count, whether it had a syntax
    error, and its resources and problems placed relative to the part's first document."""

    documents: int
    syntax_error: bool
    resources: list[tuple[Resource, int, int | None]]  # (resource, document, item)
    problems: list[Problem]


def _load_part(text: str, source: str) -> _Part:
    docs, syntax = yamlio.parse(text, json_input=False)
    if syntax is not None:
        return _Part(len(docs), True, [], [])
    problems: list[Problem] = []
    loaded = _load_documents(docs, source, problems)
    return _Part(len(docs), False, [(r, p.document, p.item) for r, p in loaded], problems)


def _part_worker(sender: Any, text: str, source: str) -> None:
    """A forked worker: loads its part and sends the `_Part` back (nothing on failure)."""
    try:
        sender.send(_load_part(text, source))
    finally:
        sender.close()


def _load_yaml_in_parts(
    text: str, source: str, problems: list[Problem], workers: int
) -> list[tuple[Resource, _Place]]:
    """`_load_text` of a YAML text, its parts loaded at once: the first here, the others
    in forked processes. Falls back to `_load_text` for a syntax error anywhere (so its
    position and cut-off are the whole text's), a worker that fails, or a process with
    threads (forking those is unsafe)."""
    # this process also takes in the others' results: a smaller part of its own
    parts = documents.split_documents(text, workers, first_share=OWN_PART_SHARE / workers)
    if len(parts) < 2 or threading.active_count() > 1:
        return _load_text(text, source, False, problems)
    import multiprocessing  # only here: most processes never load in parts

    context = multiprocessing.get_context("fork")
    children: list[tuple[Any, Any]] = []
    try:
        for part in parts[1:]:
            receiver, sender = context.Pipe(duplex=False)
            child = context.Process(target=_part_worker, args=(sender, part, source), daemon=True)
            child.start()
            sender.close()
            children.append((child, receiver))
        loaded = [_load_part(parts[0], source)]
        loaded += [receiver.recv() for _, receiver in children]
    except (EOFError, OSError):
        loaded = []
    finally:
        for child, receiver in children:
            receiver.close()
            child.join(timeout=1)
            if child.is_alive():
                child.kill()
                child.join()
    if not loaded or any(part.syntax_error for part in loaded):
        return _load_text(text, source, False, problems)
    out: list[tuple[Resource, _Place]] = []
    first = 0
    for part in loaded:
        out += [(r, _Place(source, first + doc, item)) for r, doc, item in part.resources]
        problems += [msgspec.structs.replace(p, document=first + p.document)
                     if p.document is not None else p for p in part.problems]
        first += part.documents
    return out


def _expand(doc: Any, place: _Place, problems: list[Problem]) -> list[tuple[_Place, Any]]:
    """``[(place, object)]``: the document itself, or the items of a List."""
    if not isinstance(doc, dict):
        return [(place, doc)]
    kind = doc.get("kind")
    if not isinstance(kind, str) or not kind.endswith("List"):
        return [(place, doc)]
    item_kind = kind[: -len("List")]
    if item_kind and item_kind not in KINDS:
        return [(place, doc)]
    items = doc.get("items")
    if items is None:
        items = []
    if not isinstance(items, list):
        problems.append(place.problem("expected a list of objects", field="items", kind=kind))
        return []
    expanded = []
    for i, item in enumerate(items):
        if item_kind and isinstance(item, dict):
            item = {"apiVersion": KINDS[item_kind].api_version, "kind": item_kind, **item}
        expanded.append((_Place(place.source, place.document, i), item))
    return expanded


def _identity(obj: dict[str, Any]) -> tuple[str, str, str]:
    kind = obj.get("kind") if isinstance(obj.get("kind"), str) else ""
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else ""
    namespace = meta.get("namespace") if isinstance(meta.get("namespace"), str) else ""
    return kind, namespace, name


def _load_object(obj: Any, place: _Place, problems: list[Problem]) -> Resource | None:
    if not isinstance(obj, dict):
        problems.append(place.problem(
            f"expected a mapping (a Kubernetes object), got {type(obj).__name__}"))
        return None
    kind, namespace, name = _identity(obj)
    info = KINDS.get(kind)
    if info is not None:
        namespace = (namespace or DEFAULT_NAMESPACE) if info.namespaced else ""
    ident = {"kind": kind, "namespace": namespace, "name": name}
    header = _check_header(obj, info)
    if header is not None:
        problems.append(place.problem(header[1], field=header[0], **ident))
        return None
    assert info is not None
    try:
        as_json = msgspec.json.encode(obj)
    except (TypeError, msgspec.EncodeError) as exc:
        problems.append(place.problem(f"value cannot be represented as JSON: {exc}", **ident))
        return None
    except RecursionError:
        problems.append(place.problem("nested too deeply to be a Kubernetes object", **ident))
        return None
    manifest = _with_namespace(obj, info.namespaced)
    typed, errors = convert(kind, manifest, nulls=b"null" in as_json)
    if typed is not None:
        errors = validate(typed)
    if errors:
        problems.extend(place.problem(e.message, field=e.field, **ident) for e in errors)
        return None
    return Resource(kind=kind, api_version=info.api_version, namespace=namespace,
                    name=name, manifest=manifest)


def _check_header(obj: dict[str, Any], info: Any) -> tuple[str, str] | None:
    """``(field, message)`` when apiVersion/kind are missing, unknown or mismatched."""
    kind, api_version = obj.get("kind"), obj.get("apiVersion")
    if kind is None:
        return "kind", "kind is required"
    if not isinstance(kind, str):
        return "kind", f"expected str, got {type(kind).__name__}"
    if info is None:
        return "kind", f"unknown kind {kind!r}; supported kinds: {', '.join(KINDS)}"
    if api_version is None:
        return "apiVersion", f"apiVersion is required (expected {info.api_version!r})"
    if api_version != info.api_version:
        return "apiVersion", f"{kind} requires apiVersion {info.api_version!r}, got {api_version!r}"
    return None


def _with_namespace(obj: dict[str, Any], namespaced: bool) -> dict[str, Any]:
    manifest = _deep_copy(obj)
    meta = manifest.get("metadata")
    if meta is None:
        meta = manifest["metadata"] = {}
    if not isinstance(meta, dict):
        return manifest
    if namespaced:
        if not meta.get("namespace"):
            meta["namespace"] = DEFAULT_NAMESPACE
    else:
        meta.pop("namespace", None)
    return manifest


def _deep_copy(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy sharing nothing with ``obj`` (a msgpack round trip: many times faster than
    ``copy.deepcopy`` for plain data; ``deepcopy`` for what msgpack cannot carry)."""
    try:
        copied = msgspec.msgpack.decode(msgspec.msgpack.encode(obj))
    except (TypeError, OverflowError, msgspec.EncodeError, msgspec.DecodeError):
        return copy.deepcopy(obj)
    return copied if copied == obj else copy.deepcopy(obj)


def _check_duplicates(
    resources: list[tuple[Resource, _Place]], problems: list[Problem]
) -> None:
    first: dict[str, _Place] = {}
    for resource, place in resources:
        if resource.key in first:
            problems.append(place.problem(
                f"duplicate object: also defined in {first[resource.key].describe()}",
                kind=resource.kind, namespace=resource.namespace, name=resource.name))
        else:
            first[resource.key] = place


__all__ = ["STDIN", "load_manifests", "loads", "resource_from_manifest"]
