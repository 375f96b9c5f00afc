"""Per-request task grants: credentials -> grant -> per-token bits -> masked activation."""

GRANT_ENV = "VLLM_GUARD_GRANTS"  # path of the grants file; enables per-request grants
GRANT_XARG = "vllm_guard_grant"  # vllm_xargs key the middleware sets (comma-joined tasks)
