"""Data: built-in datasets, manifest ingest and validation, the preprocessed cache and the Dataset."""
