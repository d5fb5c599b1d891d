"""Event Delivery: the shared library behind the per-type delivery jobs."""
