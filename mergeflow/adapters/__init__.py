"""Adapters from third-party model libraries to plain encoders and state dicts that Mergeflow can merge."""
