"""Prefect flows: they only wire the stages of ``tasks/`` together and version the results."""
