"""AMP cache flows: CORS, the origin hop, /collect, clientId links."""
