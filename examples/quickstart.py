"""Placeholder replaced by the quickstart once adapters are committed."""
