"""Text generation: sampling, batched KV-cached decoding and the CUDA-graph fast path."""

from legolm.generation.generate import GenerationConfig, GenerationResult, generate, generate_text

__all__ = ["GenerationConfig", "GenerationResult", "generate", "generate_text"]
