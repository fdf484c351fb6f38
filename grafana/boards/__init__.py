"""One module per Strata dashboard; ``grafana.dashboards`` lists them in order."""
