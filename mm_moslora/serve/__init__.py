"""Serving: an OpenAI-compatible API and a chat page over the one inference engine (`mm-moslora-serve`).

- `protocol`: OpenAI chat-completions requests -> engine messages, responses and error objects
- `images`: image_url sources (data URLs; local files and http(s) only when allowed) and size limits
- `scheduler`: batches concurrent requests through `InferenceEngine.generate`
- `app`: the Starlette routes (API, /health, the page in static/index.html)
- `cli`: flags, loading the model behind a listening server, a server in a thread for tests

Nothing is imported here, so that `mm-moslora-serve` can say which extra is missing.
"""
