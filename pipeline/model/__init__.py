"""The model: tokenization and framing, forward passes (padded, packed, Triton attention), pooling, rerankers,
the remote backend. It takes plain options (``ModelOptions``) and knows no job.
"""
