"""The fleet dashboard: MQTT subscriber, fleet state in SQLite, a live web page."""
