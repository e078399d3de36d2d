"""pipefit's MCP server: ``python -m pipefit.mcp_server`` or ``pipefit serve`` (stdio), ``--http PORT`` for HTTP."""
