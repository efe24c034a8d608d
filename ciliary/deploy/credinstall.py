"""``python -m ciliary.deploy.credinstall --user USER SRC DST``: the init container that
puts a pod's NATS credential where its process reads it.

A Secret volume cannot give a file to a non-root user with mode 0600 (with ``fsGroup`` the
kubelet makes it group-readable, 0440, which ``natscreds.read_credential`` refuses). This
step runs as the pod's user, reads the credential from the Secret and writes it, mode 0600,
into a memory-backed ``emptyDir`` the service container mounts read-only.

Invariants:
- ``SRC`` must hold a credential of exactly ``USER`` (a Secret loaded with another
  service's file is refused, naming both users); the seed must be an nkey user seed.
- ``DST`` is written to a temporary name, mode 0600, then renamed: the service never
  reads half a file. On any error one line on stderr naming the file and field, exit 1,
  nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ciliary import natscreds
from ciliary.config import NatsCredential


def check_credential(data: bytes, user: str, source: str) -> NatsCredential:
    """Decode ``data`` as ``user``'s credential; ``CredentialError`` names ``source``."""
    cred = natscreds.decode_credential(data, source)
    if cred.user != user:
        raise natscreds.CredentialError(f"NATS credential {source}: field user: is {cred.user!r}, "
                                        f"this pod runs as {user!r}")
    natscreds.check_seed(cred, source)
    return cred


def install(src: Path, dst: Path, user: str) -> None:
    try:
        data = src.read_bytes()
    except OSError as err:
        raise natscreds.CredentialError(f"NATS credential {src}: {err.strerror or err}") from None
    check_credential(data, user, str(src))
    natscreds.write_private(dst, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ciliary.deploy.credinstall")
    parser.add_argument("--user", required=True, help="the NATS user this pod runs as")
    parser.add_argument("src", help="the credential as mounted from the Secret")
    parser.add_argument("dst", help="where the service reads it (CILIARY_NATS_CREDS)")
    args = parser.parse_args(argv)
    try:
        install(Path(args.src), Path(args.dst), args.user)
    except (natscreds.CredentialError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{args.dst}: credential of {args.user}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
