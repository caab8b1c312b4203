"""Shared plumbing below the domains, knowing none of them: stage schemas and atomic writes, shards,
manifests and resumable steps, step fingerprints, the data readers (and the built-in data), model
resolution, object storage and logging."""
