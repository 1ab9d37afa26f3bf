"""MLflow's basic auth, with read-only users: the `authorization_function` of the stack's MLflow server.

Loaded inside `mlflow server --app-name basic-auth` as `mergeflow_mlflow_gate:authenticate` (this folder is put on
the server's PYTHONPATH, so the server imports neither Mergeflow nor torch). MLflow's own rules let any
authenticated user create experiments and registered models; a user named in `MERGEFLOW_MLFLOW_READ_ONLY_USERS`
(comma-separated) gets, on top of MLflow's permission checks, nothing but reads: GET/HEAD/OPTIONS, and the POST
routes that only search (`.../search`, `.../search-*`, `/graphql`, whose mutations are searches). Every other
request of such a user is answered 403 before MLflow handles it.
"""

from __future__ import annotations

import os

READ_ONLY_USERS_ENV = "MERGEFLOW_MLFLOW_READ_ONLY_USERS"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def read_only_users() -> frozenset[str]:
    return frozenset(name.strip() for name in os.environ.get(READ_ONLY_USERS_ENV, "").split(",") if name.strip())


def reads_only(method: str, path: str) -> bool:
    """Whether a request only reads: a read method, or a POST to a search route."""
    if method.upper() in READ_METHODS:
        return True
    last = path.rstrip("/").rsplit("/", 1)[-1]
    return method.upper() == "POST" and (last in ("search", "graphql") or last.startswith("search-"))


def authenticate():
    """MLflow's basic auth; then a read-only user's writes are refused (403)."""
    from flask import request
    from mlflow.server.auth import authenticate_request_basic_auth, make_forbidden_response

    result = authenticate_request_basic_auth()
    username = getattr(result, "username", None)
    if username and username in read_only_users() and not reads_only(request.method, request.path):
        return make_forbidden_response()
    return result
