"""Open Inference Protocol (KServe v2 REST) with Triton's binary tensor extension, sans-I/O.

Split by audience: ``codec`` (tensors ⇄ JSON and binary, shared), ``server`` (requests in,
responses and documents out), ``client`` (requests out, responses in). Each side converts the
codec's internal ``Malformed`` into its own public error once, at its public functions. Callers
import the side they use (``agent.serving.oip.server`` …): this file imports nothing, so the
daemon, which imports the server side, does not load the client's modules.
"""
