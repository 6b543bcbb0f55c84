"""HTTP routers, one per concern: thin layers that parse, call and answer."""
