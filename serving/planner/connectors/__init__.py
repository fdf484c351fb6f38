"""Connectors turn a planner decision into replicas: ``local`` (worker processes of
``strata serve``), ``kubernetes`` (the ``scale`` subresource of the role's Deployment) and
``virtual`` (the offline simulator's workers)."""
