"""Fuzzed CNI input: any network configuration on stdin and any CNI environment give a
request or a ``CNIError`` (which the plugin prints as the CNI error document) — never
another exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from services.node.cni_protocol import COMMANDS, CNIError, parse_request
from tests.unit.fuzz_strategies import FUZZ, json_values, shaped, strings

CONF_WORDS = ["cniVersion", "name", "type", "cluster", "node", "nodeNetns", "ipam", "subnet", "dataDir",
              "natsUrl", "natsCreds", "mode", "plugins", "prevResult", "runtimeConfig"]
ENV_NAMES = ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH"]


def confs() -> st.SearchStrategy[str]:
    plausible = st.fixed_dictionaries(
        {"cniVersion": st.one_of(st.sampled_from(["1.0.0", "0.4.0", "0.3.1", ""]), strings)},
        optional={w: st.one_of(shaped(CONF_WORDS), st.sampled_from(["10.200.1.0/24", "host", "sandbox", "x"]))
                  for w in CONF_WORDS if w != "cniVersion"})
    return st.one_of(st.text(max_size=80), json_values().map(json.dumps), plausible.map(json.dumps))


def envs() -> st.SearchStrategy[dict[str, Any]]:
    value = st.one_of(st.sampled_from([*COMMANDS, "/var/run/netns/x", "/proc/1/ns/net", "eth0",
                                       "K8S_POD_NAME=a;K8S_POD_NAMESPACE=b", "a=b=c;;=", ""]), strings)
    anything = st.dictionaries(st.sampled_from(ENV_NAMES), value, max_size=len(ENV_NAMES))
    complete = st.fixed_dictionaries({  # gets past the environment checks to the configuration
        "CNI_COMMAND": st.sampled_from(["ADD", "DEL", "CHECK"]), "CNI_CONTAINERID": st.text(min_size=1, max_size=20),
        "CNI_NETNS": st.sampled_from(["/var/run/netns/ciliary-x", "/proc/1/ns/net"]), "CNI_IFNAME": st.just("eth0"),
    }, optional={"CNI_ARGS": value, "CNI_PATH": value})
    return st.one_of(anything, complete)


@FUZZ
@given(envs(), confs())
def test_any_cni_call_is_a_request_or_a_cni_error(env: dict[str, str], stdin: str) -> None:
    try:
        request = parse_request(env, stdin)
    except CNIError as err:
        assert str(err)
    else:
        assert request.command in COMMANDS
