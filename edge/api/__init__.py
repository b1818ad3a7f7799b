"""The HTTP interface: FastAPI routes for the OpenAI-compatible API (`openai_api`), its
request/response schema (`openai_schema`), Prometheus metrics (`metrics`) and the chat page
at / (`chat_page`, its files in static/).

Translates the wire format into engine requests through edge.launch and the scheduler;
never touches tensors. May import edge.launch, edge.engine (and edge.model's errors).
"""
