"""The local gateway: serves gateway/kong.yml (decK format, Kong 3.9) the way production Kong does.

Run it with `python -m services.gateway`; see gateway/README.md for what it
reproduces and where it differs from Kong.
"""
