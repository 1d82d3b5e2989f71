"""Directory service: agencies, staff, teams, portal identities; issues and publishes access-token keys.

Run with `python -m services.directory` (see __main__ for the sub-commands).
"""
