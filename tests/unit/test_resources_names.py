"""``names.check_ip`` accepts and rejects exactly what ``ipaddress`` does."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from ciliary.resources import names


def reference(value: str, family: int | None) -> str | None:
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return f"must be a valid IP address, got {value!r}"
    if family is not None and ip.version != family:
        return f"must be an IPv{family} address, got {value!r}"
    return None


octets = st.one_of(st.integers(0, 300).map(str), st.sampled_from(["00", "01", "099", "", " 1", "1 ", "٣", "+1", "0x1"]))
addresses = st.one_of(
    st.lists(octets, min_size=3, max_size=5).map(".".join),
    st.sampled_from(["::1", "::ffff:10.0.0.1", "fe80::1%eth0", "1.2.3.4/32", "1.2.3.4\n", ""]),
    st.text(max_size=16),
)


@settings(max_examples=500, deadline=None)
@given(value=addresses, family=st.sampled_from([None, 4, 6]))
def test_check_ip_matches_ipaddress(value: str, family: int | None) -> None:
    assert names.check_ip(value, family=family) == reference(value, family)
