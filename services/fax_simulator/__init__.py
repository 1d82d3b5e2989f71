"""A Phaxio-shaped (API v2) fax provider for development and tests: `python -m services.fax_simulator`.

Fictional data only; never deployed. See README.md for its endpoints, control API and faults.
"""
