"""A one-tool MCP server (streamable HTTP) for the end-to-end test, run in the proxy's venv (it has ``mcp``).

python fake_mcp.py PORT
"""

from __future__ import annotations

import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("weather")


@server.tool()
def get_weather(city: str) -> str:
    """The weather in a city (always sunny)."""
    return f"Sunny in {city}"


if __name__ == "__main__":
    server.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[1]), stateless_http=True)
