"""Workloads: the five real domains, train/eval splits, and replay schedules."""

from osd.workloads.datasets import DOMAINS, Query, data_root, load_domain, parse_domains, split_of

__all__ = ["DOMAINS", "Query", "data_root", "load_domain", "parse_domains", "split_of"]

from osd.workloads.schedule import (
    DEFAULT_DRIFT_SPEC,
    Bursts,
    ClosedLoop,
    Drift,
    Gradual,
    Poisson,
    Schedule,
    ScheduledRequest,
    Stationary,
    Switch,
    parse_schedule,
)

__all__ += [
    "DEFAULT_DRIFT_SPEC",
    "Bursts",
    "ClosedLoop",
    "Drift",
    "Gradual",
    "Poisson",
    "Schedule",
    "ScheduledRequest",
    "Stationary",
    "Switch",
    "parse_schedule",
]
