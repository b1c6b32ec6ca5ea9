"""Ray Serve deployment with an OpenAI-compatible API. Not implemented yet: lands with issue #6."""
