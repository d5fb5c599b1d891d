"""Beam jobs: one entry point per job family."""
