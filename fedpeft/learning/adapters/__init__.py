"""Adapter methods that peft lacks, registered as peft methods on import.

Importing this package (or ``fedpeft.learning.adapters.bottleneck``) registers the ``bottleneck`` peft
method (Houlsby and Pfeiffer adapters); do it in every process that builds or loads one.
"""

from fedpeft.learning.adapters.bottleneck import (
    ADAPTER_TYPES,
    BOTTLENECK,
    BottleneckConfig,
    BottleneckLayer,
    BottleneckModel,
    default_target_modules,
)

__all__ = [
    "ADAPTER_TYPES",
    "BOTTLENECK",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "default_target_modules",
]
