"""Fixtures for the data-pipeline tests."""
