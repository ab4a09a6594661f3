"""The parts the composition root (agent.daemon) builds, runs and shuts down, one concern each."""
