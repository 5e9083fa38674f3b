"""The gateway: one port in front of every vLLM instance, routing by the request's ``model``.

``python -m pipeline.gateway`` is started by the supervisor when the serve TOML has
``[gateway] enable = true``; its configuration arrives in ``PIPELINE_GATEWAY_CONFIG``
(:mod:`pipeline.gateway.config`). Modules: :mod:`~pipeline.gateway.wire` (HTTP/1.1 framing),
:mod:`~pipeline.gateway.proxy` (the asyncio server), :mod:`~pipeline.gateway.states` (following
the supervisor's ``state.json``), :mod:`~pipeline.gateway.metrics` (Prometheus text).
"""
