"""Demo material that runs against the CPU build of vLLM.

``tiny_model.py`` is a standalone script, run with the vLLM venv's python (it must not import
this package): it writes a tiny random Llama model that the CPU build of vLLM can serve.
"""
