"""``rdzvctl doctor``: a checklist of the endpoint, the run and its bootstrap.

:func:`diagnose` gathers (:mod:`rdzvctl.doctor.run`, bounded I/O), the
checks judge (:mod:`rdzvctl.doctor.checks`, pure), the probes resolve and
connect concurrently (:mod:`rdzvctl.doctor.probes`).
"""

from rdzvctl.doctor.checks import Check
from rdzvctl.doctor.run import SCHEMA, Diagnosis, diagnose

__all__ = ["Check", "Diagnosis", "diagnose", "SCHEMA"]
