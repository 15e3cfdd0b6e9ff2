"""The MCP surface of kda: one server process per role, tool declarations, CLI."""
