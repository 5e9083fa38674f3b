"""The offline bundle: its format (pixi-pack's), packing it, and unpacking it safely."""
