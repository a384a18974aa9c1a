"""Model components: attention, MoE, MTP, RoPE, blocks and the full transformer."""
