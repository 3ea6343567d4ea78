"""pifa-modifier: MPIFA low-rank compression for llm-compressor."""
