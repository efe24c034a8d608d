"""The identity service's settings from the environment.

Invariants:
- A bad number is logged naming the variable and its default is used; an invalid label
  pattern is reported and skipped, the others still apply. Nothing here stops the service.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ciliary import config

from . import fqdn
from .labels import LabelFilter, LabelPattern, PatternError

ENV_LABELS = "CILIARY_IDENTITY_LABELS"
ENV_GC_GRACE = "CILIARY_IDENTITY_GC_GRACE"
ENV_ORPHAN_AGE = "CILIARY_IDENTITY_ORPHAN_AGE"
DEFAULT_GC_GRACE = 15 * 60.0  # Cilium's identity GC interval
DEFAULT_ORPHAN_AGE = 60.0


@dataclass(frozen=True)
class IdentityConfig:
    labels: str = ""
    gc_grace: float = DEFAULT_GC_GRACE
    orphan_age: float = DEFAULT_ORPHAN_AGE
    fqdn_min_ttl: float = fqdn.DEFAULT_MIN_TTL
    fqdn_max_entries: int = fqdn.DEFAULT_MAX_ENTRIES

    @classmethod
    def from_env(cls) -> IdentityConfig:
        return cls(
            labels=os.environ.get(ENV_LABELS, ""),
            gc_grace=config.env_number(ENV_GC_GRACE, DEFAULT_GC_GRACE, minimum=0),
            orphan_age=config.env_number(ENV_ORPHAN_AGE, DEFAULT_ORPHAN_AGE, minimum=0),
            fqdn_min_ttl=config.env_number(fqdn.ENV_MIN_TTL, fqdn.DEFAULT_MIN_TTL, minimum=0),
            fqdn_max_entries=int(config.env_number(fqdn.ENV_MAX_ENTRIES, fqdn.DEFAULT_MAX_ENTRIES,
                                                   integer=True, minimum=1)),
        )

    @property
    def gc_interval(self) -> float:
        return min(30.0, max(0.2, self.gc_grace / 4))


def label_filter(config: str) -> tuple[LabelFilter, list[str]]:
    """The filter for ``CILIARY_IDENTITY_LABELS``; invalid patterns are reported and skipped."""
    good, errors = [], []
    for text in config.split():
        try:
            LabelPattern.parse(text)
        except PatternError as err:
            errors.append(str(err))
            continue
        good.append(text)
    return LabelFilter.from_config(good), errors
