"""The ctypes layouts in services/node/layouts.py match bpf/lib/types.h exactly.

A small C program is generated from the ctypes field lists, compiled with the
system gcc against bpf/lib/*.h, and its sizeof/offsetof output is compared with
ctypes. No root, no kernel, no bcc.
"""

from __future__ import annotations

import ctypes as ct

import pytest

from services.node import layouts
from tests.unit.cprog import run_c_program

CONSTANTS = (
    "DROP_POLICY", "DROP_POLICY_DENY", "DROP_NO_SERVICE", "DROP_INVALID_SIP",
    "DROP_NAT_NO_MAPPING", "DROP_NO_FIB",
    "DIR_INGRESS", "DIR_EGRESS", "DIR_SERVICE", "EVENT_PAYLOAD_LEN", "CT_KEY_F_SERVICE",
    "CT_KEY_F_HOST", "CT_F_SERVICE", "CT_F_SNAT", "NAT_KEY_FWD", "NAT_KEY_REV",
    "REASON_EVENT_LOST", "VERDICT_AUDIT", "EP_F_AUDIT_EGRESS", "EVENT_F_POLICY_VERDICT",
    "SVC_FLAG_EXTERNAL_IP", "SVC_FLAG_NODEPORT", "SVC_FLAG_EXT_LOCAL_SCOPE", "SVC_FLAG_AFFINITY",
    "SVC_FLAG_LOADBALANCER", "SVC_FLAG2_INT_LOCAL_SCOPE", "SVC_FLAG2_MAGLEV",
)
# config.h defaults (no -D given to gcc)
CONFIG_DEFAULTS = ("LB_MAGLEV_TABLE_SIZE", "LB_MAGLEV_SEED", "NODEPORT_SNAT_MIN", "NODEPORT_SNAT_MAX")
JHASH_CASES = ((0, 0, 0, 0), (0x0A00010A, 0x50001F90, 6, 0x5CA1AB1E),
               (0xFFFFFFFF, 0x12345678, 17, 0xDEADBEEF), (1, 2, 3, 4))


def _c_program() -> str:
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        '#include "types.h"',
        '#include "drop.h"',
        '#define CILIARY_PIN_DIR "/unused"',
        '#include "config.h"',
        '#include "jhash.h"',
        "int main(void) {",
    ]
    for cname, layout in layouts.C_STRUCTS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for fname, _ in layout._fields_:
            lines.append(
                f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));'
            )
    for const in CONSTANTS:
        lines.append(f'printf("#{const} %d\\n", (int)({const}));')
    for const in CONFIG_DEFAULTS:
        lines.append(f'printf("#{const} %u\\n", (unsigned)({const}));')
    for a, b, c, seed in JHASH_CASES:
        lines.append(f'printf("jhash.{a}.{b}.{c}.{seed} %u\\n", jhash_3words({a}u, {b}u, {c}u, {seed}u));')
    lines += ["return 0;", "}"]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    out = run_c_program(_c_program(), tmp_path_factory.mktemp("layouts"))
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.parametrize("cname", sorted(layouts.C_STRUCTS))
def test_struct_matches_c(c_layout, cname):
    layout = layouts.C_STRUCTS[cname]
    assert ct.sizeof(layout) == c_layout[cname], f"sizeof(struct {cname})"
    for fname, _ in layout._fields_:
        assert getattr(layout, fname).offset == c_layout[f"{cname}.{fname}"], f"{cname}.{fname}"


def test_every_map_layout_is_a_c_struct():
    known = set(layouts.C_STRUCTS.values())
    for name, (key, value) in layouts.ALL_MAPS.items():
        if key in (layouts.Lb4BackendKey,):
            assert ct.sizeof(key) == 4, name  # plain __u32 key in C
            continue
        assert key in known and value in known, name


def test_constants_match_c(c_layout):
    for const in CONSTANTS:
        assert getattr(layouts, const) == c_layout[f"#{const}"], const


def test_config_defaults_match_c(c_layout):
    from services.node.datapath import MapSizes

    for const in CONFIG_DEFAULTS:
        assert getattr(layouts, const) == c_layout[f"#{const}"], const
    assert MapSizes().maglev_table == layouts.LB_MAGLEV_TABLE_SIZE


def test_jhash_matches_c(c_layout):
    from services.node.maps import jhash_3words

    for a, b, c, seed in JHASH_CASES:
        assert jhash_3words(a, b, c, seed) == c_layout[f"jhash.{a}.{b}.{c}.{seed}"]


def test_cilium_drop_numbers():
    assert layouts.DROP_POLICY == 133
    assert layouts.DROP_NO_SERVICE == 158
    assert layouts.DROP_POLICY_DENY == 181


def test_byte_order_helpers_round_trip():
    k = layouts.IpcacheKey(prefixlen=32, ip=layouts.ip4("10.0.1.2"))
    assert bytes(k)[4:] == bytes([10, 0, 1, 2])
    assert layouts.ip4_str(k.ip) == "10.0.1.2"
    b = layouts.Lb4Backend(port=layouts.port(8080))
    assert bytes(b)[4:6] == (8080).to_bytes(2, "big")
    assert layouts.port_int(b.port) == 8080
    assert layouts.IpcacheKey.from_bytes(bytes(k)) == k
    assert "ip=10.0.1.2" in repr(k)
