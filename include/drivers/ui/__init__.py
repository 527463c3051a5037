"""The driver coverage page (served by plugins/drivers_coverage.py)."""
