"""Serving: the continuous-batching decode loop of one replica (no Ray, no HTTP here)."""

from osd.serving.loop import (
    Delta,
    RequestResult,
    ServeRequest,
    ServingLoop,
    SwapEvent,
    visible_text,
)

__all__ = ["Delta", "RequestResult", "ServeRequest", "ServingLoop", "SwapEvent", "visible_text"]
