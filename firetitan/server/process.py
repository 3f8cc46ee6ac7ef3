"""Re-exports `firetitan.process` (spawning and stopping worker processes), which client and server share."""

from firetitan.process import (  # noqa: F401
    PARENT_PID_ENV,
    WorkerProcess,
    pid_alive,
    spawn_worker,
    stop_pid,
)
