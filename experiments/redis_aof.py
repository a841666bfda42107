"""The embedded Redis's persistence, measured: the cost of one record write (XADD of 6 kB,
about one distill record) with ``appendfsync always`` and ``everysec``, and the time from a
SIGKILL of the redis-server to it answering again with all its entries (the supervisor's
restart and the AOF reload).

    python experiments/redis_aof.py
"""

import os
import signal
import statistics
import time

from osd.buffer import EmbeddedRedis, RedisStreamBuffer

RECORD = os.urandom(6000)
N = 2000


def main() -> None:
    for fsync in ("always", "everysec"):
        with EmbeddedRedis(appendfsync=fsync) as srv:
            buf = RedisStreamBuffer(srv.url, consumer="m")
            t = time.perf_counter()
            for _ in range(N):
                buf.put("d", RECORD)
            dt = time.perf_counter() - t
            print(f"appendfsync {fsync}: {1e6 * dt / N:.0f} us per 6 kB XADD ({N / dt:.0f}/s)")
    with EmbeddedRedis(max_backoff_s=0.5) as srv:
        buf = RedisStreamBuffer(srv.url, consumer="m")
        for _ in range(N):
            buf.put("d", RECORD)
        times = []
        for _ in range(10):
            pid, t = srv.pid, time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while srv.pid == pid or srv.outage.down:
                time.sleep(0.005)
            while True:
                try:
                    n = buf.length("d")
                    break
                except Exception:
                    time.sleep(0.005)
            times.append(time.perf_counter() - t)
            assert n == N, n
        print(
            f"SIGKILL -> answering with all {N} entries: median "
            f"{1e3 * statistics.median(times):.0f} ms, max {1e3 * max(times):.0f} ms over 10 kills"
        )


if __name__ == "__main__":
    main()
