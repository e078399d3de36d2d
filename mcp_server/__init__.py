"""pipefit's MCP server: ``python -m mcp_server`` or ``pipefit serve`` (stdio), ``--http PORT`` for HTTP."""
