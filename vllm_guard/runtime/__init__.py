"""Per-process runtime state shared by the loader, the masked op and the runner hook.

The three depend on this package, never on each other:
checkpoint -> loader -> (weights + neuron tables) -> masked op <- grant buffer <- runner hook.
Only constants live here so that the API server can import them without torch.
"""

PUBLIC_BIT = 1 << 62  # every token carries it; public neurons have all bits set
NEURON_BITS_ATTR = "guard_neuron_bits"  # per-layer int64 [I] table the loader attaches
GRANT_BUFFER_ATTR = "guard_grants"  # each masked layer's reference to the grant buffer
GRANT_XARG = "vllm_guard_grant"  # vllm_xargs key the grant middleware sets (comma-joined tasks)
HEAD_BITS_ATTR = "guard_head_bits"  # per-layer int64 [o_proj input] table for sealed heads
