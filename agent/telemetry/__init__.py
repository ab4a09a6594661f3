"""Metrics, system health and MQTT reporting."""
