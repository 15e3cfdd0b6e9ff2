"""A bare MCPServer with one tool: the yardstick for benchmarks/startup.py."""

from mcp.server.mcpserver import MCPServer

server = MCPServer(name="bare", log_level="WARNING")


@server.tool()
def echo(text: str) -> str:
    """Echo the text."""
    return text


if __name__ == "__main__":
    server.run("stdio")
