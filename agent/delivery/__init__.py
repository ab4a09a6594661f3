"""Secure model delivery: TUF metadata and targets over HTTPS."""
