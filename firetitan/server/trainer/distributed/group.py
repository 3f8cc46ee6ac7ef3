"""The process group of a data-parallel trainer: rank 0 starts ranks 1..N-1, all join, rank 0 watches them."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from firetitan.errors import InvalidRequestError, WorkerCrashedError
from firetitan.logging import get_logger
from firetitan.server.trainer.distributed import MAX_WORLD_SIZE

log = get_logger("firetitan.server.trainer.distributed")

RANK_MODULE = "firetitan.server.trainer.distributed.rank"
# A collective that waits longer than this for a peer fails (gloo) instead of hanging; rank 0's
# watcher normally notices a dead rank within WATCH_INTERVAL_S, long before.
COLLECTIVE_TIMEOUT_S = 300.0
# The command channel waits for the next request for as long as the job lives: ranks 1..N-1 idle on
# it between requests, so it has no practical timeout (a dead rank 0 is caught by the parent watchdog).
COMMAND_TIMEOUT_S = 10 * 365 * 24 * 3600.0
WATCH_INTERVAL_S = 0.1
# After failing its pending futures, rank 0 waits this long (long-polls answer) before exiting.
FAIL_GRACE_S = 0.5
# A future failed by a dead rank answers 409 (not WorkerCrashedError's usual 503, which clients
# retry into a worker that is about to exit): final, like the control plane's "job not running".
RANK_DIED_STATUS = 409


def rank_died(message: str) -> WorkerCrashedError:
    return WorkerCrashedError(message, field="world_size", status_code=RANK_DIED_STATUS)


def check_world_size(value: int, field: str = "world_size") -> int:
    if type(value) is not int or not 1 <= value <= MAX_WORLD_SIZE:
        raise InvalidRequestError(f"{field}: {value!r} is not a valid world size (an integer 1..{MAX_WORLD_SIZE})",
                                  field=field)
    return value


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int, world_size: int) -> torch.device:
    """The device rank `rank` computes on: CUDA ranks take one GPU each, counting from the job's
    (`cuda:i` puts rank r on `cuda:i+r`), because NCCL refuses two ranks on one GPU; other device
    types are shared. Selects the GPU for this process (FSDP2 and NCCL allocate on the current one)."""
    if device.type != "cuda":
        return device
    first = device.index or 0
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if first + world_size > count:
        raise InvalidRequestError(
            f"world_size: {world_size} CUDA ranks starting at cuda:{first} need GPUs "
            f"{first}..{first + world_size - 1}, and this host has {count}; lower world_size or start at cuda:0",
            field="world_size")
    index = first + rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@dataclass
class RankGroup:
    """This process's place in the group, the command channel, and (rank 0) its child ranks."""

    rank: int
    world_size: int
    device: torch.device
    commands: Any  # the ProcessGroup that carries operations from rank 0
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _stopping: bool = False

    def send(self, message: Any) -> None:
        """Rank 0: hand one operation to every other rank."""
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self.commands)

    def receive(self) -> Any:
        """Ranks 1..N-1: wait for rank 0's next operation."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.commands)
        return box[0]

    def watch(self, on_failure: Callable[[WorkerCrashedError], None]) -> None:
        """Rank 0: a daemon thread that fails the job as soon as any child rank exits."""
        threading.Thread(target=self._watch, args=(on_failure,), name="rank-watcher", daemon=True).start()

    def dead_rank(self, wait_s: float = 0.0) -> str | None:
        """Rank 0: a message naming the first child rank that has exited (waiting up to `wait_s` for
        one to be seen dead), or None while all run."""
        deadline = time.monotonic() + wait_s
        while True:
            for rank, child in enumerate(self.children, start=1):
                code = child.poll()
                if code is not None:
                    return (f"trainer rank {rank} of {self.world_size} (pid {child.pid}) exited with code "
                            f"{code}; the data-parallel job cannot continue and rank 0 exits")
            if time.monotonic() >= deadline:
                return None
            time.sleep(WATCH_INTERVAL_S)

    def _watch(self, on_failure: Callable[[WorkerCrashedError], None]) -> None:
        while not self._stopping:
            message = self.dead_rank()
            if message is not None and not self._stopping:
                self._fail(message, on_failure)
                return
            time.sleep(WATCH_INTERVAL_S)

    def _fail(self, message: str, on_failure: Callable[[WorkerCrashedError], None]) -> None:
        # Plain stderr as well as the structured log: the control plane keeps the end of the log in the
        # job's FAILED status, so the line is printed again last, after the failed call's traceback.
        print(f"firetitan trainer: {message}", file=sys.stderr, flush=True)
        log.error("rank_died", message=message)
        with contextlib.suppress(Exception):
            on_failure(rank_died(message))
        self.kill_children()
        time.sleep(FAIL_GRACE_S)
        print(f"firetitan trainer: {message}", file=sys.stderr, flush=True)
        os._exit(1)

    def kill_children(self) -> None:
        self._stopping = True
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.send_signal(signal.SIGKILL)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)


def _init(rank: int, world_size: int, store: Any, device: torch.device) -> Any:
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    # A separate gloo group for commands, so idling between requests never hits the compute timeout.
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=COMMAND_TIMEOUT_S))


def start_group(world_size: int, device: torch.device, rank_args: list[str],
                on_failure: Callable[[WorkerCrashedError], None]) -> RankGroup:
    """Rank 0: open the rendezvous store on a free loopback port, start ranks 1..N-1, watch them
    (`on_failure`, then exit, as soon as one dies, also while joining), join them.

    Children are plain subprocesses of `python -m firetitan.server.trainer.distributed.rank` (not
    torch.multiprocessing): they must not inherit this process's aiohttp loop and threads (fork), and
    a spawned interpreter would re-import this worker's __main__; their output goes to our log.
    """
    check_world_size(world_size)
    device = rank_device(device, 0, world_size)  # before any child starts: a host short of GPUs is a 400
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    env = {**os.environ, "FIRETITAN_PARENT_PID": str(os.getpid())}
    children = []
    for rank in range(1, world_size):
        cmd = [sys.executable, "-m", RANK_MODULE, "--rank", str(rank), "--world-size", str(world_size),
               "--port", str(store.port), *rank_args]
        children.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env))
    group = RankGroup(rank=0, world_size=world_size, device=device, commands=None, children=children)
    group.watch(on_failure)  # a rank that fails to start must not leave us waiting in the rendezvous
    try:
        group.commands = _init(0, world_size, store, device)
    except BaseException:
        group.kill_children()
        raise
    log.info("process_group_ready", world_size=world_size, backend=backend_for(device), port=store.port,
             pids=[c.pid for c in children])
    return group


def join_group(rank: int, world_size: int, port: int, device: torch.device) -> RankGroup:
    """Ranks 1..N-1: connect to rank 0's store and join the group."""
    device = rank_device(device, rank, world_size)
    store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                          timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return RankGroup(rank=rank, world_size=world_size, device=device, commands=_init(rank, world_size, store, device))


def watch_parent(parent_pid: int) -> None:
    """Ranks 1..N-1: exit at once when rank 0 is gone (it may die by SIGKILL: no goodbye message)."""
    def run() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=run, name="parent-watchdog", daemon=True).start()
