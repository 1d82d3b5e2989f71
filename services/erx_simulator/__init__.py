"""A DoseSpot-shaped ePrescribing vendor for development and tests: `python -m services.erx_simulator`.

Fictional data only; never deployed. See README.md for its endpoints, control API and faults.
"""
