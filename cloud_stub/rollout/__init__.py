"""Fleet rollouts that steer themselves: decisions, state, the controller."""
