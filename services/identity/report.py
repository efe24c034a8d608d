"""Label hygiene for the identity service's ``report`` answer: the shared analysis of
``ciliary.identityreport`` (which identity labels multiply identities).

Invariant: nothing is defined here; ``ciliary preflight`` and this service flag the same
labels with the same code.
"""

from __future__ import annotations

from ciliary.identityreport import (
    GENERATED_RATIO,
    UNIQUE_RATIO,
    cardinality_report,
    looks_generated,
)

__all__ = ["GENERATED_RATIO", "UNIQUE_RATIO", "cardinality_report", "looks_generated"]
