"""``ciliary preflight``: can this node, this label design, this scale and this operations
setup run ciliary? The seed's four questions and its decision tree.

Modules, each with one job:
- ``kernel``: the catalogue of kernel checks ciliary's datapath needs and the verdict per
  ciliary feature from probe results (pure).
- ``probe``: runs those checks on the running kernel (bpf(2) through ctypes, tc in a
  throw-away namespace, a throw-away cgroup); the only module here with I/O.
- ``pods``: a ``kubectl get pods -A -o json`` list validated into pod facts (pure).
- ``labels``: label hygiene of a pod list under a label filter, against the identity
  ceiling of the cluster's ID layout (pure).
- ``sizing``: expected BPF map entries for a scale, against each map's ``max_entries``,
  with the setting that raises it and the memory it costs (pure).
- ``decision``: the decision tree (upgrade the baseline first / govern labels first /
  train first / pilot) with its reasons (pure).

Invariant: every module but ``probe`` is a pure core (no bus, no asyncio, no bcc), checked
by the import contracts in ``pyproject.toml``; the CLI (``ciliary.cli.preflight``) gathers
the inputs and prints.
"""
