"""The `vllm serve` child process: which interpreter, which flags, start, readiness, stop, log tail."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from firetitan.errors import ConfigError, WorkerCrashedError

REPO_ROOT = Path(__file__).resolve().parents[4]
VLLM_PYTHON_ENV = "FIRETITAN_VLLM_PYTHON"
_LOG_TAIL_BYTES = 4000
_TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4")


def vllm_python(explicit: str | None = None) -> Path:
    """The vLLM virtualenv's interpreter: `explicit`, else $FIRETITAN_VLLM_PYTHON, else ./.venv-vllm."""
    value = explicit or os.environ.get(VLLM_PYTHON_ENV) or str(REPO_ROOT / ".venv-vllm" / "bin" / "python")
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"vLLM interpreter {value!r} does not exist; build it with `make vllm-env` or set "
                          f"{VLLM_PYTHON_ENV} to a python that has vllm installed", field="vllm_python")
    return path


def _term_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the worker dies, even by SIGKILL (no orphaned vLLM)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class VllmOptions:
    """What the child is started with (the worker's flags map onto these)."""

    model_dir: Path
    served_name: str
    max_num_seqs: int = 64
    max_model_len: int = 2048
    threads: int | None = None
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE takes whole GiB
    seed: int = 0
    extra_args: list[str] = field(default_factory=list)


class VllmChild:
    """`vllm serve` on a private loopback port, in its own session (so a stop takes its engine core too)."""

    def __init__(self, python: Path, options: VllmOptions, log_path: Path) -> None:
        self.python, self.options, self.log_path = python, options, log_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        o = self.options
        vllm_bin = self.python.parent / "vllm"
        head = [str(vllm_bin)] if vllm_bin.is_file() else [str(self.python), "-m", "vllm.entrypoints.cli.main"]
        return [*head, "serve", str(o.model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                "--served-model-name", o.served_name, "--dtype", "float32", "--enforce-eager",
                "--max-num-seqs", str(o.max_num_seqs), "--max-model-len", str(o.max_model_len),
                # sampling_logprob = the distribution actually sampled from (after temperature/top-k/top-p)
                "--logprobs-mode", "processed_logprobs",
                # per-request queue_time_ms in the final usage chunk -> prefill-queue-duration
                "--enable-per-request-metrics",
                # a prefix cache would outlive weight swaps; prompts are short RL prompts anyway
                "--no-enable-prefix-caching", "--seed", str(o.seed),
                "--disable-uvicorn-access-log", *o.extra_args]

    def preload(self) -> list[str]:
        """LD_PRELOAD for the child, as vLLM's CPU guide asks (it warns at start without them): tcmalloc
        when the system has it, and the Intel OpenMP that vllm-cpu installs into its venv."""
        found = [p for p in _TCMALLOC if Path(p).is_file()][:1]
        iomp = self.python.parent.parent / "lib" / "libiomp5.so"
        return found + ([str(iomp)] if iomp.is_file() else [])

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        threads = self.options.threads or max(1, (os.cpu_count() or 1))
        env.update({
            "VLLM_SERVER_DEV_MODE": "1",  # /pause, /resume, /collective_rpc, weight versions (loopback only)
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1",
            "VLLM_CPU_OMP_THREADS_BIND": env.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}"),
            "VLLM_CPU_KVCACHE_SPACE": env.get("VLLM_CPU_KVCACHE_SPACE", str(self.options.kv_cache_gib)),
            "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        })
        preload = self.preload()
        if preload:
            env["LD_PRELOAD"] = ":".join([*preload, *filter(None, [env.get("LD_PRELOAD")])])
        return env

    def spawn(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), env=self.env(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_term_with_parent)

    async def start(self, timeout: float = 600.0) -> None:
        """Spawn the child and wait until its /health answers 200."""
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise WorkerCrashedError(f"vllm serve exited with {self.proc.returncode} while starting:\n"
                                             f"{self.log_tail()}")
                try:
                    async with session.get(f"{self.url}/health") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        self.stop()
        raise WorkerCrashedError(f"vllm serve not ready after {timeout:.0f}s:\n{self.log_tail()}")

    async def label_version(self, version: str) -> None:
        """Name the weights vLLM serves (its `/update_weight_version`), as each hot-load does later."""
        async with aiohttp.ClientSession() as session, \
                session.post(f"{self.url}/update_weight_version", json={"new_version": version}) as resp:
            resp.raise_for_status()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
