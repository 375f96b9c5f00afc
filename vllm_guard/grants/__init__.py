"""Per-request task grants: credentials -> grant -> per-token bits -> masked activation."""

