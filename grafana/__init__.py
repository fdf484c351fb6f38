"""Grafana dashboards and the monitoring objects generated with them.

``python -m grafana.generate`` writes them.

``panels`` builds Grafana JSON from plain values, ``dashboards`` defines Strata's dashboards (the
one source of truth), ``generate`` writes them as JSON files, ConfigMaps and the PrometheusRule.
"""
