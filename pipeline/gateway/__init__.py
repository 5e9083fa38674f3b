"""The gateway: one port in front of every vLLM instance, routing by the request's ``model``.

``python -m pipeline.gateway`` is started by the supervisor when the serve TOML has
``[gateway] enable = true``; its configuration arrives in ``PIPELINE_GATEWAY_CONFIG``
(:mod:`pipeline.gateway.config`). Modules: :mod:`~pipeline.gateway.wire` (HTTP/1.1 framing),
:mod:`~pipeline.gateway.proxy` (the asyncio server: listening socket, routing table, ``serve``),
:mod:`~pipeline.gateway.client` (the client protocol, routing and auth on a request's head),
:mod:`~pipeline.gateway.exchange` (one proxied request), :mod:`~pipeline.gateway.upstream`
(pools, replicas, the connection to an instance), :mod:`~pipeline.gateway.endpoints`
(``/health``, ``/v1/models``, ``/metrics``, error bodies), :mod:`~pipeline.gateway.conn` (the
read buffer the connections share), :mod:`~pipeline.gateway.states` (following the
supervisor's ``state.json``), :mod:`~pipeline.gateway.metrics` (Prometheus text).
"""
