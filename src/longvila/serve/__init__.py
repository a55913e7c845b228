"""OpenAI-compatible serving: `longvila.serve.server.create_server(model, processor, port=...)`."""
