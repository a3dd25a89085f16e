"""Sans-I/O protocol core: framing and message schema. No asyncio, no sockets, no clock."""
