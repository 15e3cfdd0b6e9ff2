"""The kda engine: one module per capability, callable and tested without MCP."""
