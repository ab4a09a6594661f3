"""Confidential models: device identity, the encrypted envelope, decryption into memory."""
