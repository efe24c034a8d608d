"""NATS credential files: generated per instance, read by every process that connects.

Invariants:
- ``write_instance_credentials`` makes a fresh nkey for every user of ``natsauth.users``,
  writes each user's credential (seed, user name, inbox prefix) to
  ``<dir>/<user>.json`` with mode 0600 in a directory of mode 0700, and nats-server's
  ``authorization`` block (public keys and permissions only, no seed) to ``auth_file``
  with mode 0600. Files are written to a temporary name and renamed, so a reader never
  sees half a file; a second call replaces every key (the old ones stop working once
  nats-server restarts on the new block).
- ``read_credential`` raises ``CredentialError`` naming the file and what is wrong
  (missing, unreadable, not a credential, readable by others); it never returns a
  credential it could not check.
- The same files serve a Kubernetes deployment: each one can be mounted from a Secret and
  named by ``CILIARY_NATS_CREDS``; ``python -m ciliary.natscreds`` writes a set.
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import msgspec
import nkeys

from ciliary import atomicfile, config, natsauth
from ciliary.config import NatsCredential


class CredentialError(Exception):
    """A credential file is missing or unusable; the message names the file."""


def new_seed() -> str:
    """A fresh nkey seed of a NATS user."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()


def public_key(seed: str) -> str:
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, through a temporary name and a rename (a
    reader never sees half a file)."""
    atomicfile.write_atomically(path, data, 0o600)


def write_instance_credentials(creds_dir: Path, auth_file: Path, users: Iterable[natsauth.User],
                               *, tls_ca: str = "") -> dict[str, Path]:
    """One credential file per user and the server's authorization block; returns the
    credential path of every user. With ``tls_ca`` every credential names the CA that
    signed the server's certificate."""
    creds_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(creds_dir, 0o700)
    listed = list(users)
    keys: dict[str, str] = {}
    paths: dict[str, Path] = {}
    for user in listed:
        seed = new_seed()
        keys[user.name] = public_key(seed)
        path = creds_dir / f"{user.name}.json"
        write_private(path, msgspec.json.format(msgspec.json.encode(
            NatsCredential(user=user.name, seed=seed, inbox_prefix=user.inbox_prefix, tls_ca=tls_ca))))
        paths[user.name] = path
    write_private(auth_file, natsauth.server_authorization(listed, keys).encode())
    return paths


def decode_credential(data: bytes, source: str | Path) -> NatsCredential:
    """``data`` as a credential file; ``CredentialError`` names ``source``."""
    try:
        return msgspec.json.decode(data, type=NatsCredential)
    except msgspec.DecodeError as err:
        raise CredentialError(f"NATS credential {source}: not a credential file: {err}") from None


def check_seed(cred: NatsCredential, source: str | Path) -> None:
    """Raise ``CredentialError`` (naming ``source``) unless ``cred`` holds an nkey user seed."""
    try:
        public_key(cred.seed)
    except Exception as err:  # nkeys raises its own errors for a malformed seed
        raise CredentialError(f"NATS credential {source}: field seed: not an nkey user seed "
                              f"({type(err).__name__})") from None
    if not cred.seed.startswith("SU"):
        raise CredentialError(f"NATS credential {source}: field seed: not an nkey user seed")


def read_credential(path: str | Path) -> NatsCredential:
    path = Path(path)
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as err:
        raise CredentialError(f"NATS credential {path}: {err.strerror or err}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialError(f"NATS credential {path}: readable by others "
                              f"(mode {stat.S_IMODE(mode):04o}); it must be 0600")
    cred = decode_credential(data, path)
    check_seed(cred, path)
    return cred


def instance_credential(data_dir: Path, user: str) -> NatsCredential | None:
    """The credential ``ciliary up`` wrote for ``user`` in ``data_dir``; None when the
    instance has none (it runs without NATS authentication)."""
    path = config.nats_credential_path(data_dir, user)
    if not path.exists():
        return None
    return read_credential(path)


def main(argv: list[str] | None = None) -> None:
    """Write a credential set for a deployment (e.g. to load into Kubernetes Secrets)."""
    parser = argparse.ArgumentParser(prog="python -m ciliary.natscreds",
                                     description="write NATS credentials and the server's authorization block")
    parser.add_argument("--out", required=True, help="directory for <user>.json files and auth.conf")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--nodes", required=True, help="comma-separated node names")
    args = parser.parse_args(argv)
    out = Path(args.out)
    nodes = [n for n in args.nodes.split(",") if n]
    paths = write_instance_credentials(out, out / "auth.conf", natsauth.users(args.cluster, nodes))
    for user, path in paths.items():
        print(f"{user:<16} {path}")
    print(f"{'(server)':<16} {out / 'auth.conf'}")


if __name__ == "__main__":
    main()
