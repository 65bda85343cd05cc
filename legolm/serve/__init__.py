"""`legolm serve`: an OpenAI-compatible HTTP server on legolm's decoders.

``config`` (the settings), ``protocol`` (request bodies and responses), ``engine`` (the thread that
owns the model and batches requests), ``job`` (a request as the engine sees it, and its events),
``backends`` (continuous batching, memory models, fused batch-1, LEGO early exit), ``sampler``
(per-request token choice in a shared batch), ``text`` (incremental detokenization, stop strings),
``sessions`` (memory sessions), ``chat`` (chat templates), ``metrics`` (Prometheus text) and ``app``
(the FastAPI routes). The whole job, model to listening socket, is `legolm.recipes.serve`.
"""
