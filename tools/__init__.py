"""pipefit's tool functions: plain typed functions that return pydantic models.

Each module holds one capability. Nothing here prints or speaks MCP; the CLI (``pipefit``) and the
MCP server only translate arguments and render results. torch and diffusers are imported lazily,
inside the functions that need them, so importing this package stays cheap.
"""
