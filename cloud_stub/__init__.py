"""Fleet side: publish signed models, serve the repository, watch the fleet."""
