"""natsrotate: at every step the server accepts every key a credential file holds."""

from __future__ import annotations

import re
from pathlib import Path

from ciliary import natsauth, natscreds, natsrotate

USERS = natsauth.users("c1", ["node-1"])


def accepted(auth_file: Path) -> dict[str, set[str]]:
    """User -> public keys the authorization block accepts (the comment before each entry)."""
    out: dict[str, set[str]] = {}
    user = ""
    for line in auth_file.read_text().splitlines():
        if m := re.match(r"\s+# (\S+):", line):
            user = m.group(1)
        elif m := re.search(r"nkey: (\S+),", line):
            out.setdefault(user, set()).add(m.group(1))
    return out


def held(creds_dir: Path) -> dict[str, str]:
    return {u.name: natscreds.public_key(natscreds.read_credential(creds_dir / f"{u.name}.json").seed)
            for u in USERS}


def test_every_step_accepts_what_the_files_hold(tmp_path: Path) -> None:
    creds, auth = tmp_path / "creds", tmp_path / "auth.conf"
    natscreds.write_instance_credentials(creds, auth, USERS, tls_ca="/ca.pem")
    first = held(creds)
    rotation = natsrotate.plan(creds, USERS)
    new = rotation.new_keys
    assert rotation.old_keys == first and all(new[u] != first[u] for u in first)

    natsrotate.overlap(rotation, auth)
    assert accepted(auth) == {u: {first[u], new[u]} for u in first}
    assert held(creds) == first  # nothing handed out yet
    natsrotate.hand_out(rotation, creds)
    assert held(creds) == new
    assert all(natscreds.read_credential(creds / f"{u.name}.json").tls_ca == "/ca.pem" for u in USERS)
    assert all(natscreds.read_credential(creds / f"{u.name}.json").inbox_prefix == u.inbox_prefix for u in USERS)
    natsrotate.retire(rotation, auth)
    assert accepted(auth) == {u: {new[u]} for u in first}
    assert not any(cred.seed in auth.read_text() for cred in rotation.new.values())  # no seed in the block
    assert (creds / "admin.json").stat().st_mode & 0o777 == 0o600


def test_a_user_without_a_credential_gets_one(tmp_path: Path) -> None:
    creds, auth = tmp_path / "creds", tmp_path / "auth.conf"
    natscreds.write_instance_credentials(creds, auth, USERS[:-1])
    rotation = natsrotate.plan(creds, USERS)
    added = USERS[-1].name
    assert added not in rotation.old_keys
    natsrotate.overlap(rotation, auth)
    assert accepted(auth)[added] == {rotation.new_keys[added]}
    natsrotate.hand_out(rotation, creds)
    assert held(creds)[added] == rotation.new_keys[added]
