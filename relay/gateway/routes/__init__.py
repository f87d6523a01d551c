"""The gateway's routes, one module per resource; none imports another."""
