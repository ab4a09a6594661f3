"""The fleet store: device state, events and rollouts for the dashboards and the controller."""
