"""The HTTP interface: the OpenAI-compatible API (`openai_api`, its request/response schema
in `openai_schema`) and the Ollama-compatible API (`ollama_api`), two thin adapters side by
side over one HTTP runtime (`runtime`: state, config, admission, tokenizing, jobs, the error
type) and its middleware (`middleware`: host/auth guard, body cap, request log, error
handlers); Prometheus metrics (`metrics`), connection limits (`connections`) and the chat
page at / (`chat_page`, its files in static/).

Translates the wire format into engine requests through edge.launch and the scheduler, and
the job's pieces (edge.engine.replies) back; never touches tensors. May import edge.launch,
edge.engine (its refusals `ContextFull`/`QueueFull` from edge.engine itself). The adapters do
not import each other.
"""
