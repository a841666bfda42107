"""A registry store on Redis, so a restarted registry actor — on any node — has every version.

Implements ``osd.registry.RegistryStore``. Keys (``prefix`` defaults to ``osd:registry:``)::

    <prefix>drafters            set of drafter ids
    <prefix><id>:meta           the index as JSON (versions, live pointer, history, references)
    <prefix><id>:w:<version>    safetensors bytes of one version

Weights are written before the index that names them (the registry does that), and each
``SET`` is atomic, so a crash leaves the old or the new index, never a torn one. The
values are data only — JSON and safetensors — and are validated when read (the registry
re-checks each version's checksum on load). Use a Redis with persistence (AOF,
``deploy/redis.conf``) for versions to survive a Redis restart too.
"""

from __future__ import annotations

import json

import redis

from osd.registry import DrafterMeta, RegistryError, check_drafter_id

__all__ = ["RedisStore"]


class RedisStore:
    """``RegistryStore`` on one Redis database; see the module docstring."""

    def __init__(self, client: redis.Redis, prefix: str = "osd:registry:") -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, drafter_id: str, *parts: object) -> str:
        return ":".join([self.prefix + check_drafter_id(drafter_id), *map(str, parts)])

    def put_weights(self, drafter_id: str, version: int, data: bytes) -> None:
        self.client.set(self._key(drafter_id, "w", int(version)), bytes(data))

    def get_weights(self, drafter_id: str, version: int) -> bytes:
        data = self.client.get(self._key(drafter_id, "w", int(version)))
        if data is None:
            raise RegistryError(f"no weights stored for {drafter_id!r} v{version} in Redis")
        return bytes(data)

    def delete_weights(self, drafter_id: str, version: int) -> None:
        self.client.delete(self._key(drafter_id, "w", int(version)))

    def put_meta(self, drafter_id: str, meta: DrafterMeta) -> None:
        text = json.dumps(meta.to_dict(), sort_keys=True)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key(drafter_id, "meta"), text.encode())
        pipe.sadd(self.prefix + "drafters", drafter_id)
        pipe.execute()

    def get_meta(self, drafter_id: str) -> DrafterMeta | None:
        raw = self.client.get(self._key(drafter_id, "meta"))
        if raw is None:
            return None
        try:
            return DrafterMeta.from_dict(json.loads(raw))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise RegistryError(
                f"registry index of {drafter_id!r} in Redis is invalid: {err}"
            ) from None

    def drafter_ids(self) -> list[str]:
        ids = (
            m.decode() if isinstance(m, bytes) else m
            for m in self.client.smembers(self.prefix + "drafters")
        )
        return sorted(i for i in ids if self.client.exists(self._key(i, "meta")))
