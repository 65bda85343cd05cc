"""The bottom floor of the model: `ModelConfig`, the layer-type names, RoPE, the KV cache and the layer context."""
