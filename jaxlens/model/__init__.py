"""The pure core: embed, norms, rotary, attention, MLP, one block scanned over layers, and `forward`."""
