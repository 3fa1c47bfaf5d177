"""Process groups: how the launcher and the tests start a swarm process and make sure all of it stops.

A swarm process is several processes (the node, its DHT and averager processes, two p2pd daemons), so it
is started as the leader of its own process group (pgid == its pid), and stopping it means signalling
that group, then SIGKILLing whatever is left of it and waiting until nothing of it runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import IO, Optional, Sequence

import psutil

STOP_GRACE = 15.0  # seconds between the first signal and SIGKILL, and for the group to be gone after it


def start_group(argv: Sequence[str], log: IO, *, piped: bool = False, env: Optional[dict] = None,
                cwd: Optional[str] = None) -> subprocess.Popen:
    """``argv`` as the leader of a new process group. Its output goes to ``log``; with ``piped`` only its
    stderr does, and its stdin and stdout are text pipes to this process."""
    pipe = subprocess.PIPE if piped else None
    return subprocess.Popen(list(argv), stdin=pipe, stdout=pipe if piped else log,
                            stderr=log if piped else subprocess.STDOUT, text=piped, env=env, cwd=cwd,
                            start_new_session=True)


def stop_groups(processes: Sequence[subprocess.Popen], signum: int = signal.SIGTERM, *, leader_only: bool = False,
                grace: float = STOP_GRACE) -> list[psutil.Process]:
    """Send ``signum`` to each process's group (or, with ``leader_only``, to the leader alone, which then
    stops its children itself), wait up to ``grace`` seconds for the leaders, SIGKILL every group (also the
    daemons a clean exit leaves behind), reap the leaders, and wait for the groups to be gone.
    Returns the members still running after that (an empty list when all stopped)."""
    for process in processes:
        _signal(process.pid, signum, group=not leader_only)
        _signal(process.pid, signal.SIGCONT, group=True)  # a frozen process must run to see the signal
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            pass
        _signal(process.pid, signal.SIGKILL, group=True)
        process.wait()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        left = [member for process in processes for member in group_members(process.pid)]
        if not left:
            return []
        time.sleep(0.1)
    return left


def group_members(pgid: int) -> list[psutil.Process]:
    """Processes of group ``pgid`` still running (zombies wait for PID 1 to reap them and do not count)."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def _signal(pid: int, signum: int, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except ProcessLookupError:
        pass
