"""Long-context load test: token-exact workloads with needles, vLLM `bench serve` metrics, accuracy."""
