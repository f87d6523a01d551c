"""The execute pipeline: one module per stage (authenticate, ratelimit, validate, idempotency,
authorize), run in the contract's order by `relay.pipeline.run.ExecutePipeline.admit`."""
