"""The HTTP server: OpenAI routes, the Azure ML /score route, continuous batching, batch scoring."""
