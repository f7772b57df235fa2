"""Linux process plumbing: the tree and session of a process, and stopping it by PID.

fedsim starts processes (a localhost deployment's SuperLink and SuperNodes, the
benchmark's child runs) each in a session of its own, and stops exactly those: by
their PIDs and the process groups they lead, never by name. A process that
outlives its parent is re-parented to init but keeps its session, so the session
finds it. Reads ``/proc``; elsewhere the table is empty.
"""

import os
import signal


def process_table() -> dict[int, tuple[int, int]]:
    """Map every pid to its (parent pid, session id), from ``/proc/<pid>/stat``."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    raw = stat.read()
            except OSError:  # the process ended meanwhile
                continue
            fields = raw[raw.rfind(b")") + 2 :].split()  # after "(comm)": state ppid pgrp sid
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def process_tree(root: int) -> set[int]:
    """Return ``root``, its descendants, and any process left in its session."""
    table = process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid not in tree:
            tree.add(pid)
            stack.extend(children.get(pid, ()))
    return tree | {pid for pid, (_, session) in table.items() if session == root}


def signal_group(leader: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group ``leader`` leads (a child of ``start_new_session``)."""
    try:
        os.killpg(leader, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_if_alive(pid: int) -> None:
    """SIGKILL ``pid`` unless it is gone already."""
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
