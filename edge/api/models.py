"""Models by name in the HTTP APIs, over the shared registry of loaded models
(`edge.launch.loaded_models`).

A request's `model` names the served default model (its name, installed name or an alias,
any case, ":latest" or not) or another installed model (`edge-llm models`, `edge-llm
alias`); any other name is a 404 in the API's shape (`model_not_found`). `using` gives the
route a `ModelView`: the server state as that request sees it, whose `engine`, `scheduler`
and `model_id` are the named model's, loaded first if it is not (the registry unloads the
least recently used idle model when the budget is reached). The request holds the model
until its response has ended (`ReleaseModels`, around each app), so a model is never
unloaded under a running request; its `keep_alive` (Ollama's) then applies.
"""
from __future__ import annotations

from pathlib import Path

from starlette.concurrency import run_in_threadpool

from edge.api.origins import HttpWrapper
from edge.api.runtime import ApiError, ServerState
from edge.launch import model_store
from edge.launch.aliases import normalize
from edge.launch.loaded_models import Loaded, ModelsBusy, NotEnoughMemory, model_key, parse_keep_alive

HELD = "edge_models_held"        # the request's scope["state"] key: [(entry, keep_alive), ...]


def ready(state: ServerState) -> None:
    """503 while the served model is loading or after it failed to load."""
    if state.error:
        raise ApiError(503, f"the model failed to load: {state.error}", "unavailable_error", code="model_load_failed")
    if not state.ready:
        raise ApiError(503, "the model is still loading; retry in a few seconds", "unavailable_error",
                       code="model_loading", headers={"Retry-After": "5"})


def ready_engine(state: ServerState):
    """The served default model's engine (loaded again first if a keep_alive 0 unloaded it
    goes through `using`); 503 while it loads."""
    ready(state)
    return state.engine


# --- names -> models --------------------------------------------------------------------------

def served_names(state: ServerState) -> set[str]:
    """What a client may call the served default model (compared after `aliases.normalize`):
    its name, its installed name (`edge-llm models`) and their aliases."""
    names = {normalize(state.model_id)}
    if state.default_key is not None:
        names.add(normalize(Path(state.default_key).name))
    return names | {alias for alias, target in _aliases().items() if normalize(target) in names}


def _aliases() -> dict[str, str]:
    try:
        return model_store.alias_table().load()
    except (ValueError, OSError):
        return {}


def installed(name: str) -> bool:
    """An installed model's name or alias (`edge-llm models`, `edge-llm alias`)."""
    return _installed_path(name) is not None


def _installed_path(name: str) -> Path | None:
    try:
        target = model_store.alias_table().lookup(name)
        return model_store.find_by_name(target if target is not None else name, prefix=False)
    except (ValueError, OSError):
        return None


def resolve_key(state: ServerState, name: str) -> str | None:
    """The registry key (bundle path) a request's model name means, or None: the served
    default model, a loaded model by the name /api/ps shows, or an installed model."""
    if normalize(name) in served_names(state):
        return state.default_key
    if state.models is not None:
        for e in state.models.loaded():
            if normalize(name) == normalize(e.name):
                return e.key
    path = _installed_path(name)
    return model_key(path) if path is not None else None


def model_error(state: ServerState, name: str, hint: str = "") -> ApiError | None:
    """None when `name` names the served model or an installed one; else the 404."""
    if name and resolve_key(state, name) is not None:
        return None
    message = (f"model '{name}' does not exist here; this server runs '{state.model_id}' (edge-llm models lists "
               "the installed ones, edge-llm pull installs one from the Hugging Face Hub, edge-llm alias gives it "
               "another name)")
    return ApiError(404, message + (f"; {hint}" if hint else ""), param="model", code="model_not_found")


def keep_alive_seconds(value) -> float | None:
    try:
        return parse_keep_alive(value)
    except ValueError as e:
        raise ApiError(400, str(e), param="keep_alive") from e


# --- a request's model ------------------------------------------------------------------------

class ModelView:
    """The server state as one request sees it: the named model's engine, scheduler, and name;
    everything else (config, metrics, draining ...) is the server's."""

    ready = True

    def __init__(self, server: ServerState, entry: Loaded):
        self.server, self.entry = server, entry
        self.engine, self.scheduler, self.model_id = entry.engine, entry.scheduler, entry.name

    def __getattr__(self, name):
        return getattr(self.server, name)


async def using(request, state: ServerState, name: str | None, keep_alive=None, hint: str = "") -> ModelView:
    """The model `name` names (None: the served default one), loaded if it is not, held by
    this request until its response ends. 404 for an unknown name, 400 for a bad keep_alive,
    503 when no loaded model can make room (all busy) or it does not fit in memory."""
    ready(state)
    seconds = keep_alive_seconds(keep_alive)
    key = state.default_key if name is None else resolve_key(state, name)
    if key is None:
        raise model_error(state, name, hint)
    held = request.scope["state"][HELD]
    models = state.models
    entry = models.try_acquire(key)
    if entry is not None:
        held.append((entry, seconds))
        return ModelView(state, entry)

    def load():
        got = models.acquire(key)
        held.append((got, seconds))       # in this thread: a client gone meanwhile still gives it back
        return got
    try:
        entry = await run_in_threadpool(load)
    except ModelsBusy as e:
        raise ApiError(503, str(e), "unavailable_error", code="models_busy", headers={"Retry-After": "5"}) from e
    except NotEnoughMemory as e:
        raise ApiError(503, str(e), "unavailable_error", code="insufficient_memory") from e
    except Exception as e:
        raise ApiError(500, f"model '{name}' failed to load: {e}", "server_error", code="model_load_failed") from e
    return ModelView(state, entry)


async def unload(state: ServerState, name: str) -> Loaded | None:
    """keep_alive 0 with nothing to generate (`ollama stop`, `edge-llm stop`): the model goes
    now, or when its running requests end. 404 for an unknown name; 409 for a model another
    interface of this server holds. Returns the model's entry (None: it was not loaded)."""
    ready(state)
    key = resolve_key(state, name)
    if key is None:
        raise model_error(state, name)
    entry = await run_in_threadpool(state.models.expire, key)
    if entry is not None and entry.pinned:
        raise ApiError(409, f"model '{name}' stays loaded: the serial console or the Wyoming service of this server "
                            "use it (stop the service to free its memory)", code="model_pinned")
    return entry


class ReleaseModels(HttpWrapper):
    """ASGI wrapper: the models a request held (`using`) are given back when its response has
    ended, streamed or not, whoever ended it."""

    def __init__(self, app, state: ServerState):
        super().__init__(app)
        self.state = state

    async def http(self, scope, receive, send) -> None:
        held: list = []
        scope = {**scope, "state": {**(scope.get("state") or {}), HELD: held}}
        try:
            await self.app(scope, receive, send)
        finally:
            for entry, seconds in held:
                self.state.models.release(entry, seconds)


def live(state: ServerState) -> list[Loaded]:
    """The loaded models, most recently used first (none while starting)."""
    if state.models is None:
        return []
    return [e for e in state.models.loaded() if e.engine is not None]
