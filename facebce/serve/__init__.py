"""`facebce serve`: an HTTP service (FastAPI on uvicorn, the `[serve]` extra) for enrol, identify and
verify at the gallery's global threshold. `create_app(config)` builds the app, `run(config)` serves it,
`load_config(...)` merges YAML, FACEBCE_* variables and options, `add_key` makes API keys."""
from facebce.serve.auth import SCOPES, KeyStore, add_key
from facebce.serve.config import ServeConfig, load_config

__all__ = ["SCOPES", "KeyStore", "ServeConfig", "add_key", "create_app", "load_config", "run"]


def create_app(config, **kwargs):
    from facebce.serve.app import create_app as make
    return make(config, **kwargs)


def run(config, **kwargs):
    from facebce.serve.app import run as serve
    return serve(config, **kwargs)
