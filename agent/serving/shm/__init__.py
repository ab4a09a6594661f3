"""Triton's system shared-memory extension: regions a client registers, tensors read from and
written into them (``keys`` pure checks, ``region`` the mappings, ``peer`` who a client is,
``registry`` who owns what, ``api`` the routes)."""
