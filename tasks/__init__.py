"""Pipeline stages of osteo, one module per domain step, each exposing a Prefect task."""
