"""vllm-guard benchmarks: scripts that print numbers and write JSON under benchmarks/results/."""
