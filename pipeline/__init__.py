"""Ship vLLM into air-gapped GPU containers as a pixi-pack bundle, and serve it from one TOML."""

__version__ = "0.1.0"
