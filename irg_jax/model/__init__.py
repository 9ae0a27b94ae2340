"""Model components: embeddings, SigLIP encoder, FLUX autoencoder, Qwen2-MoT decoder and the unified Bagel model."""
