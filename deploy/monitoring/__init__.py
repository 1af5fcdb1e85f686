"""Monitoring of the service: Prometheus rules (rules.yml, unit-tested by tests/*.yaml with promtool),
the Grafana dashboard (grafana-dashboard.json) and a local Prometheus (python -m deploy.monitoring.local)."""
