"""A simulated fleet: many devices in one process, speaking the device protocol."""
