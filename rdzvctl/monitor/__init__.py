"""Monitoring: rendezvous state as Prometheus metrics (``rdzvctl exporter``).

:mod:`rdzvctl.monitor.runs` reads the runs and keeps the decode cache (no
Prometheus here), :mod:`rdzvctl.monitor.collector` turns them into metric
families at scrape time, :mod:`rdzvctl.monitor.exposition` writes them as
prometheus_client's encoders do (the same bytes, each run's labels formatted
once), :mod:`rdzvctl.monitor.server` serves ``/metrics`` and ``/healthz``.
``prometheus_client`` is needed only by the last three.
"""
