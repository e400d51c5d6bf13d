"""What every network listener of `serve` shares (KServe HTTP, OpenAI, metrics, KServe gRPC): connection caps and
timeouts, one body limit, JSON and text checks, cancellation on disconnect, API keys and CORS."""
