"""Online A/B experiments: which user sees which release (`assignment`), how an experiment is
started and stopped in a registry (`control`), and the report that decides it from the service's
impression and event logs (`report`, with its statistics in `stats`)."""
