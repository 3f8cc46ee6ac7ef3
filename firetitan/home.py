"""The layout of a firetitan state directory (FIRETITAN_HOME): database, store, logs, key, discovery."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import platformdirs

from firetitan.names import check_name, resolve_under

HOME_ENV = "FIRETITAN_HOME"


@dataclass(frozen=True)
class HomeLayout:
    """Every path a control plane and its embedded clients agree on."""

    root: Path

    @property
    def state_db(self) -> Path:
        return self.root / "state.sqlite"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def trainers(self) -> Path:
        return self.root / "trainers"

    @property
    def api_key_file(self) -> Path:
        return self.root / "api_key"

    @property
    def discovery_file(self) -> Path:
        return self.root / "control_plane.json"

    @property
    def lock_file(self) -> Path:
        """Clients serialise on this while they decide whether to start a daemon and wait for it."""
        return self.root / "control_plane.lock"

    @property
    def instance_lock_file(self) -> Path:
        """A control plane holds an exclusive flock on this for its whole life (one per directory)."""
        return self.root / "control_plane.pid.lock"

    def trainer_state_dir(self, account: str, job_id: str) -> Path:
        """`trainers/<account>/<job_id>`; both are checked by the name rule and the path stays inside."""
        check_name(account, field="account")
        check_name(job_id, field="rlorTrainerJobId")
        return resolve_under(self.trainers, account, job_id, field="rlorTrainerJobId")

    def ensure(self) -> HomeLayout:
        for path in (self.root, self.store, self.logs, self.trainers):
            path.mkdir(parents=True, exist_ok=True)
        return self


def resolve_home(home: str | os.PathLike[str] | None = None) -> HomeLayout:
    """`home`, else `$FIRETITAN_HOME`, else the user's cache directory for firetitan."""
    raw = home or os.environ.get(HOME_ENV) or platformdirs.user_cache_dir("firetitan")
    return HomeLayout(Path(raw).expanduser().resolve())


def read_api_key(layout: HomeLayout) -> str | None:
    try:
        return layout.api_key_file.read_text().strip() or None
    except FileNotFoundError:
        return None


# One secret, two spellings: the official tinker SDK refuses keys without "tml-", the official
# fireworks SDK refuses keys with it (it takes them for Tinker keys). Every firetitan server accepts
# the home's key in either spelling.
TINKER_KEY_PREFIX = "tml-"
FIREWORKS_KEY_PREFIX = "fw_"


def key_spellings(api_key: str) -> tuple[str, ...]:
    """`api_key` and, for a `tml-`/`fw_` key, the same secret under the other prefix."""
    for mine, other in ((TINKER_KEY_PREFIX, FIREWORKS_KEY_PREFIX), (FIREWORKS_KEY_PREFIX, TINKER_KEY_PREFIX)):
        if api_key.startswith(mine) and len(api_key) > len(mine):
            return api_key, other + api_key[len(mine):]
    return (api_key,)


def fireworks_api_key(api_key: str) -> str:
    """The spelling of the home's key to give the official fireworks SDK (`FIREWORKS_API_KEY`)."""
    if api_key.startswith(TINKER_KEY_PREFIX) and len(api_key) > len(TINKER_KEY_PREFIX):
        return FIREWORKS_KEY_PREFIX + api_key[len(TINKER_KEY_PREFIX):]
    return api_key


def load_or_create_api_key(layout: HomeLayout) -> str:
    """The state directory's API key, generated on first use and readable by the owner only."""
    existing = read_api_key(layout)
    if existing:
        return existing
    layout.root.mkdir(parents=True, exist_ok=True)
    # "tml-": the official tinker SDK refuses keys without it, client-side (docs/tinker-sdk.md).
    key = "tml-" + secrets.token_urlsafe(32)
    try:
        fd = os.open(layout.api_key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race; use its key
        return read_api_key(layout) or key
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    return key


def write_discovery(layout: HomeLayout, url: str, pid: int) -> None:
    """Publish where this state directory's control plane listens (atomic replace)."""
    fd, tmp = tempfile.mkstemp(dir=layout.root, prefix=".control_plane-")
    with os.fdopen(fd, "w") as fh:
        json.dump({"url": url, "pid": pid}, fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, layout.discovery_file)


def read_discovery(layout: HomeLayout) -> dict[str, Any] | None:
    try:
        data = json.loads(layout.discovery_file.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) and "url" in data and "pid" in data else None


def remove_discovery(layout: HomeLayout, pid: int) -> None:
    """Remove the discovery file if it still names this process (a newer daemon may own it)."""
    info = read_discovery(layout)
    if info is not None and int(info["pid"]) == pid:
        with contextlib.suppress(FileNotFoundError):
            layout.discovery_file.unlink()


def flock_exclusive(fh: IO[Any], wait: float) -> bool:
    """Take an exclusive flock on `fh`, retrying for up to `wait` seconds; False if still held elsewhere.

    Non-blocking tries in a loop (not a blocking flock) so that the wait is bounded and a caller can
    say who holds the lock when it gives up.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def control_plane_lock_held(layout: HomeLayout) -> bool:
    """Whether a control-plane process (alive, possibly still starting or stopping) holds the
    directory's single-instance lock. The kernel drops the lock when its holder dies, so unlike the
    discovery file this never goes stale. A free lock is held shared for an instant while probing."""
    try:
        fh = open(layout.instance_lock_file, "rb")
    except FileNotFoundError:
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def running_control_plane(layout: HomeLayout, timeout: float = 2.0) -> str | None:
    """The URL of this state directory's live control plane, or None (no file, dead pid, no answer)."""
    import urllib.error
    import urllib.request

    from firetitan.process import pid_alive

    info = read_discovery(layout)
    if info is None or not pid_alive(int(info["pid"])):
        return None
    url = str(info["url"])
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:
            return url if resp.status == 200 else None
    except (urllib.error.URLError, OSError, ValueError):
        return None
