"""Kong's declarative configuration as decK writes it: templating, schema and loading."""
