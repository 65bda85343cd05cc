"""Text generation: sampling, batched KV-cached decoding, the CUDA-graph and fused fast paths, and LEGO
decoding (threshold early exit and self-speculative) for models with a shallow exit."""

from legolm.generation.generate import GenerationConfig, GenerationResult, complete, generate, generate_text

__all__ = ["GenerationConfig", "GenerationResult", "complete", "generate", "generate_text"]
