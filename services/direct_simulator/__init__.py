"""A development-only partner HISP for Direct (see README.md)."""
