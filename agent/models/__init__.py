"""Model store, runtimes, slots and the deployment lifecycle."""
