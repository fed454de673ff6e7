"""Model modules: layers, rope, vision tower, decoder, MoE, the full VLM, host-side input preparation."""
