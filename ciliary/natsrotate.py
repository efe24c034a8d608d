"""Rotating a running instance's NATS keys: every user gets a fresh nkey, no process restarts.

Three steps, each one file write plus a configuration reload of every nats-server
(``SIGHUP``):

1. ``overlap``: the authorization block accepts each user under its old and its new key,
   with the same permissions;
2. ``hand_out``: every credential file is replaced by one holding the new seed (same user,
   inbox and CA): a process that connects or reconnects from now on uses it;
3. ``retire``: the block accepts only the new keys. nats-server drops the connections still
   authenticated with an old key; each client reconnects and, reading its credential file
   again (``ciliary.bus``), signs with the new seed.

Invariants:
- Pure file work here; signalling the servers and waiting for them is the caller's.
- Every file is written to a temporary name and renamed, mode 0600: a reader never sees
  half a file, and the seeds never reach the authorization block.
- Between steps the union of accepted keys always includes every key a credential file
  holds, so no correctly configured process is refused at any point.
- A user without a credential file (a user added since the last ``up``) gets one in
  ``hand_out`` and its key is accepted from ``overlap`` on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import msgspec

from ciliary import natsauth, natscreds
from ciliary.config import NatsCredential


@dataclass(frozen=True)
class Rotation:
    users: tuple[natsauth.User, ...]
    old_keys: dict[str, str]  # user -> public key in use now (absent: no credential yet)
    new: dict[str, NatsCredential]  # user -> its next credential

    @property
    def new_keys(self) -> dict[str, str]:
        return {name: natscreds.public_key(cred.seed) for name, cred in self.new.items()}


def plan(creds_dir: Path, users: Iterable[natsauth.User], *, tls_ca: str = "") -> Rotation:
    """Fresh seeds for every user; the current keys read from ``creds_dir``
    (``natscreds.CredentialError`` names a file that cannot be read)."""
    listed = tuple(users)
    old: dict[str, str] = {}
    new: dict[str, NatsCredential] = {}
    for user in listed:
        path = creds_dir / f"{user.name}.json"
        ca = tls_ca
        if path.exists():
            current = natscreds.read_credential(path)
            old[user.name] = natscreds.public_key(current.seed)
            ca = current.tls_ca
        new[user.name] = NatsCredential(user=user.name, seed=natscreds.new_seed(),
                                        inbox_prefix=user.inbox_prefix, tls_ca=ca)
    return Rotation(listed, old, new)


def overlap(rotation: Rotation, auth_file: Path) -> None:
    new_keys = rotation.new_keys
    keys = {u.name: [k for k in (rotation.old_keys.get(u.name), new_keys[u.name]) if k] for u in rotation.users}
    natscreds.write_private(auth_file, natsauth.server_authorization(rotation.users, keys).encode())


def hand_out(rotation: Rotation, creds_dir: Path) -> None:
    for name, cred in rotation.new.items():
        natscreds.write_private(creds_dir / f"{name}.json", msgspec.json.format(msgspec.json.encode(cred)))


def retire(rotation: Rotation, auth_file: Path) -> None:
    natscreds.write_private(auth_file, natsauth.server_authorization(rotation.users, rotation.new_keys).encode())
