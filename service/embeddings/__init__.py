"""POST /v1/embeddings: CLIP image and text embeddings, zero-shot or through a prompt adapter."""
