"""Tools for backend authors: the conformance kit and a reference backend."""

from rdzvctl.testing.conformance import (
    CASES,
    BackendConformanceTests,
    CaseResult,
    ConformanceFailure,
    ConformanceLimitation,
    run_conformance,
)

__all__ = [
    "CASES",
    "BackendConformanceTests",
    "CaseResult",
    "ConformanceFailure",
    "ConformanceLimitation",
    "run_conformance",
]
