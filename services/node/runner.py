"""Pod containers as host processes inside the pod's network namespace.

Invariants:
- A container is a process started with ``ip netns exec <pod netns> <command> <args>`` in
  a session of its own, so it outlives a crash of the node executor (as containers
  outlive a kubelet restart). Its pid is recorded, and a restarted executor adopts the
  running processes instead of starting second copies.
- Restart policy follows Kubernetes: Always restarts every exit, OnFailure restarts
  non-zero exits, Never restarts nothing. Restarts back off exponentially
  (``BACKOFF_START`` doubling to ``BACKOFF_MAX``, reset after ``BACKOFF_RESET`` seconds up).
- Phase follows Kubernetes: Pending until started, Running while any container runs or
  will be restarted, Succeeded when all exited 0 and none will restart, Failed when one
  exited non-zero and will not restart.
- A container with a ``cgroup`` joins that cgroup v2 directory before it execs its
  command (a ``sh`` prologue writes its own pid to ``cgroup.procs``), so every socket it
  creates belongs to the node's cgroup (socket-level load balancing, ``socklb``).
- Pure bookkeeping (``ContainerState``, ``pod_phase``) is separate from process I/O
  (``ContainerProcess``), and every method is non-blocking.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ciliary.config import pid_alive

BACKOFF_START = 1.0
BACKOFF_MAX = 30.0
BACKOFF_RESET = 60.0
RESTART_POLICIES = ("Always", "OnFailure", "Never")
# $0 is the cgroup directory, "$@" the command; exec keeps the pid.
CGROUP_PROLOGUE = 'echo $$ > "$0/cgroup.procs" && exec "$@"'


@dataclass(frozen=True)
class ContainerSpec:
    name: str
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()


def should_restart(policy: str, exit_code: int | None) -> bool:
    if policy == "Always":
        return True
    if policy == "OnFailure":
        return exit_code != 0
    return False


@dataclass
class ContainerState:
    """What is known about one container, independent of how it runs."""

    spec: ContainerSpec
    pid: int = 0
    started_at: float = 0.0
    exit_code: int | None = None
    restarts: int = 0
    backoff: float = BACKOFF_START
    restart_at: float | None = None
    finished: bool = False  # exited and will not be restarted

    @property
    def running(self) -> bool:
        return self.pid > 0 and self.exit_code is None and not self.finished


def pod_phase(states: Sequence[ContainerState]) -> str:
    if not states or all(s.pid == 0 and s.exit_code is None for s in states):
        return "Pending"
    if any(not s.finished for s in states):
        return "Running"
    if all(s.exit_code == 0 for s in states):
        return "Succeeded"
    return "Failed"


@dataclass
class ContainerProcess:
    """One container's process: start, poll, restart with backoff, stop."""

    state: ContainerState
    netns: str  # "" runs in the caller's namespace (unit tests only)
    restart_policy: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    cgroup: str = ""  # cgroup v2 directory to run in; "" keeps the executor's

    def argv(self) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        if self.cgroup:
            # join the cgroup first: a socket belongs to the cgroup of the task creating it
            prefix = ["sh", "-c", CGROUP_PROLOGUE, self.cgroup, *prefix]
        return prefix + list(self.state.spec.argv)

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(dict(self.state.spec.env))
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.argv(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )
        self.state.pid = self.proc.pid
        self.state.started_at = time.time()
        self.state.exit_code = None
        self.state.restart_at = None

    def adopt(self, pid: int, started_at: float) -> bool:
        """Take over a process started by an earlier executor; False when it is gone."""
        if pid <= 0 or not pid_alive(pid):
            return False
        self.state.pid = pid
        self.state.started_at = started_at
        return True

    def poll(self, now: float | None = None) -> bool:
        """Advance the state machine; True when something changed."""
        now = time.time() if now is None else now
        st = self.state
        if st.finished:
            return False
        if st.restart_at is not None:
            if now >= st.restart_at:
                st.restarts += 1
                self.start()
                return True
            return False
        if st.pid == 0:
            self.start()
            return True
        code = self._exit_code()
        if code is None:
            if now - st.started_at > BACKOFF_RESET:
                st.backoff = BACKOFF_START
            return False
        st.exit_code = code
        if should_restart(self.restart_policy, code):
            st.restart_at = now + st.backoff
            st.backoff = min(st.backoff * 2, BACKOFF_MAX)
        else:
            st.finished = True
        return True

    def _exit_code(self) -> int | None:
        if self.proc is not None and self.proc.pid == self.state.pid:
            return self.proc.poll()
        # adopted: not our child, so the exit code is unknowable; report a failure
        return None if pid_alive(self.state.pid) else 255

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the container's whole session, SIGKILL after ``grace`` seconds."""
        pid = self.state.pid
        if pid <= 0:
            return
        self.state.finished = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.pid == pid:
                    if self.proc.poll() is not None:
                        return
                elif not pid_alive(pid):
                    return
                time.sleep(0.02)
