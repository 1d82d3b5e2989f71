"""The audit service: the append-only, hash-chained record of every PHI read and security event
(docs/audit.md)."""
