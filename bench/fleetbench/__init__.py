"""Helpers of bench/fleet.py."""
