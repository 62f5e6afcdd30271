"""Identity evaluation: face backends, metrics, prompt sets, reports and checkpoint selection."""
