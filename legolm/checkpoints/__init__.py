"""Loading and saving models: Hugging Face directories, GGUF files, legolm checkpoints."""
