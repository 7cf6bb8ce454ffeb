"""Operating pgherald: metrics, health and readiness, and the monitoring check.

``metrics``, ``status`` and ``slot_stats`` are leaves (they import nothing of pgherald
but ``db``), so that any layer may report to them; the rest (the scrape-time collector,
the check, the HTTP endpoints) sit beside the composition root.
"""
