"""What other engines and services read: the vLLM resolver plugin, export layouts, Hugging Face Hub push and pull."""
