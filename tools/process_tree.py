"""Every process a trial starts, found and stopped together, whatever the script does.

A script can start helpers that outlive it, and one that double-forks into a new session (setsid)
leaves both its parent and its process group. pipefit keeps hold of them with the first of these
that this machine allows, and says which (``TrialResult.containment``):

- ``cgroup``: a cgroup v2 group of the trial's own, under this process's; the runner joins it
  before the script runs, the kernel keeps every descendant in it, and ``cgroup.kill`` ends them all;
- ``subreaper``: ``PR_SET_CHILD_SUBREAPER`` (Linux) makes this process the parent of the script's
  orphans, so a double fork lands back here, where the marker it inherited in its environment names
  its trial;
- ``session``: the child's descendants, its process group and every process seen while it ran
  (other systems; a process that double-forks into a new session between two looks can escape).

With a cgroup the subreaper is taken too: it costs nothing and finds what the group cannot hold.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Literal

import psutil

Containment = Literal["cgroup", "subreaper", "session"]
MARKER_ENV = "PIPEFIT_TRIAL_ID"
_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_POLL_S = 0.02


class ProcessTree:
    """The processes of one trial: its child (``adopt``), what that child starts, and their orphans."""

    _open: set[str] = set()  # the markers of this process's trees not yet closed

    def __init__(self):
        self.marker = secrets.token_hex(8)
        self.cgroup = _new_cgroup(f"pipefit-trial-{os.getpid()}-{self.marker}")
        self.subreaper = _become_subreaper()
        self.root: int | None = None
        self._born: float | None = None  # the child's start, as psutil tells it (its clock is not time.time's)
        self._seen: dict[int, psutil.Process] = {}
        self._held = False  # the child joined the cgroup: the kernel keeps every descendant in it
        ProcessTree._open.add(self.marker)

    @property
    def environment(self) -> dict[str, str]:
        """What the child's environment must carry for its descendants to be found."""
        return {MARKER_ENV: self.marker}

    def adopt(self, pid: int) -> None:
        """The trial's child, started with ``environment`` (the runner joins ``cgroup`` itself)."""
        self.root = pid
        with contextlib.suppress(psutil.Error):
            self._born = psutil.Process(pid).create_time()

    def members(self) -> list[psutil.Process]:
        """Every live process of the trial, the child included (each found the ways this machine allows)."""
        if self.root is None:
            return []
        found = [*self._descendants(self.root), *self._orphans()]
        if self.cgroup is not None:
            in_group = _cgroup_pids(self.cgroup)
            self._held = self._held or self.root in in_group
            found += _processes(in_group)
        if os.name == "posix" and not self._held:  # start_new_session made the child its group's leader
            # every process on the machine, read: only where no cgroup holds the tree (the sampler asks twice a second)
            found += [p for p in psutil.process_iter() if _pgid(p.pid) == self.root]
        found += self._seen.values()
        live = {}
        for process in found:
            if process.pid != os.getpid() and _running(process):
                live[process.pid] = self._seen.setdefault(process.pid, process)
        return list(live.values())

    def signal(self, sig: int) -> None:
        """Send ``sig`` to every member; SIGKILL through the cgroup also reaches what starts meanwhile."""
        if sig == getattr(signal, "SIGKILL", None) and self.cgroup is not None:
            with contextlib.suppress(OSError):
                (self.cgroup / "cgroup.kill").write_text("1")
        if os.name == "posix" and self.root is not None:
            with contextlib.suppress(OSError):
                os.killpg(self.root, sig)
        for process in self.members():
            with contextlib.suppress(psutil.Error):
                process.send_signal(sig)

    def stop(self, grace: float, root_exited=lambda: True) -> None:
        """SIGTERM every member, SIGKILL what is left after ``grace`` seconds, and reap the orphans
        that came back here. ``root_exited`` says whether the caller has seen its child end (the
        caller reaps its own child: its exit status is the caller's to read)."""
        for sig, patience in ((signal.SIGTERM, grace), (getattr(signal, "SIGKILL", signal.SIGTERM), 5.0)):
            self.signal(sig)
            deadline = time.monotonic() + patience
            while time.monotonic() < deadline:
                self._reap_orphans()
                if root_exited() and not [p for p in self.members() if p.pid != self.root]:
                    return
                time.sleep(_POLL_S)

    def close(self) -> None:
        """Remove the cgroup (once empty); reap the last orphans."""
        ProcessTree._open.discard(self.marker)
        self._reap_orphans()
        if self.cgroup is None:
            return
        deadline = time.monotonic() + 2.0
        while True:
            try:
                self.cgroup.rmdir()
                return
            except OSError:
                if time.monotonic() > deadline:
                    return  # still populated: the kernel removes nothing; the next run tries again
                time.sleep(_POLL_S)

    # ---- finding ------------------------------------------------------------------------------

    def _descendants(self, pid: int) -> list[psutil.Process]:
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def _orphans(self) -> list[psutil.Process]:
        """The orphans the subreaper got back, with their own children: this process's children that
        carry the trial's marker, or, while this is the only trial running here, that dropped their
        environment, were born during it and left this process's session (the double fork's mark)."""
        if not self.subreaper:
            return []
        found, alone, session = [], ProcessTree._open == {self.marker}, os.getsid(0)
        for child in psutil.Process().children():
            if child.pid == self.root:
                continue
            try:
                marker = child.environ().get(MARKER_ENV)
                ours = marker == self.marker or (
                    marker is None and alone and self._born is not None and child.create_time() >= self._born
                    and os.getsid(child.pid) != session
                )  # fmt: skip
            except (psutil.Error, OSError):
                continue
            if ours:
                found += self._descendants(child.pid)
        return found

    def _reap_orphans(self) -> None:
        """Collect the exit status of this trial's orphans that ended here (they would stay zombies)."""
        if not self.subreaper or not hasattr(os, "waitpid"):
            return
        for pid in list(self._seen):
            if pid == self.root:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    del self._seen[pid]


def _become_subreaper() -> bool:
    """Ask Linux to make this process the parent of its descendants' orphans."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _new_cgroup(name: str) -> Path | None:
    """A new cgroup v2 group under this process's own, or None where this machine does not allow one."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        mount = next(
            Path(fields[4]) for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if (fields := line.split()) and fields[fields.index("-") + 1] == "cgroup2"
        )  # fmt: skip
        own = next(line[3:] for line in Path("/proc/self/cgroup").read_text().splitlines() if line.startswith("0::"))
    except (OSError, StopIteration, ValueError):
        return None
    parent = mount / own.lstrip("/")
    _remove_stale(parent)
    group = parent / name  # a child of this process's group: where that is ours to divide
    try:  # a read-only mount, a group not delegated to this user: no cgroup, the subreaper instead
        group.mkdir()
    except OSError:
        return None
    if not os.access(group / "cgroup.procs", os.W_OK):
        with contextlib.suppress(OSError):
            group.rmdir()
        return None
    return group


def _remove_stale(parent: Path) -> None:
    """Empty groups left by pipefit processes that died mid-trial (a populated group cannot be removed)."""
    with contextlib.suppress(OSError):
        for group in parent.glob("pipefit-trial-*-*"):
            owner = group.name.split("-")[2]
            if owner.isdigit() and not psutil.pid_exists(int(owner)):
                with contextlib.suppress(OSError):
                    group.rmdir()


def _cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _processes(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            found.append(psutil.Process(pid))
    return found


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
