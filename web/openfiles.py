"""The server process's open-file limit: each socket is a file descriptor.

Many systems start a service with a soft limit of 1,024 open files (systemd's default) under a
hard limit hundreds of times that. At the soft limit the event loop can no longer accept: a
connection past it is dropped without an answer and without a log line, so a fleet of a
thousand miners saw reconnects nobody could explain. ``serve`` raises the soft limit to the
hard one (as Go's runtime does at start) and says so when even that is low.
"""

from __future__ import annotations

import resource

__all__ = ["LOW_OPEN_FILES", "MAX_OPEN_FILES", "raise_open_files"]

# Below this many, ``serve`` warns at start: room for a few thousand sockets, not 10,000.
LOW_OPEN_FILES = 4096
# Linux refuses a soft limit past fs.nr_open (1,048,576 by default), even under an unlimited
# hard limit.
MAX_OPEN_FILES = 1 << 20


def raise_open_files() -> tuple[int, str | None]:
    """Raise the soft open-file limit to the hard one; returns the limit now in force and a
    warning to print when it is below ``LOW_OPEN_FILES``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(hard, MAX_OPEN_FILES)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (OSError, ValueError):  # a hard limit past fs.nr_open: keep the soft one
            pass
    if soft == resource.RLIM_INFINITY or soft >= LOW_OPEN_FILES:
        return soft, None
    return soft, (
        f"the open-file limit is {soft} (its hard limit): about that many sockets at most, and "
        "connections past it are dropped unanswered; raise it (ulimit -n, or LimitNOFILE= in a "
        "systemd unit)"
    )
