"""headlab probes: one module per method, each with a `scan(model, ...) -> HeadScores`."""
