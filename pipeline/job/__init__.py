"""The embedding job: config, plan and manifest, readers and records, runner, sink, claims, launch, status."""
