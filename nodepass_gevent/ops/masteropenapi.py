"""The master's own OpenAPI 3.1.1 document and its Swagger UI page.

ROUTES is the list of every route the master answers (master.py's router
refuses anything else with 404 or 405); tests/test_master.py checks the two
against each other both ways. The shapes follow v1.14's document
(../shared/wire-v114/transcripts/master-openapi.json), trimmed to what we do.
"""

from typing import Dict

# path -> {method: summary}; "public" routes need no key.
ROUTES = {
    "/instances": {"get": "List every instance (and the ******** key pseudo-instance)",
                   "post": "Create an instance from a server:// or client:// URL"},
    "/instances/{id}": {"get": "Get an instance", "patch": "Act on or edit an instance",
                        "put": "Replace an instance's URL", "delete": "Delete an instance"},
    "/events": {"get": "Server-sent events: initial, create, update, delete, log, shutdown"},
    "/info": {"get": "Host and master figures", "post": "Set the master's alias"},
    "/tcping": {"get": "TCP connect test to target=host:port"},
    "/openapi.json": {"get": "This document"},
    "/docs": {"get": "Swagger UI for this document"},
}
PUBLIC = ("/openapi.json", "/docs")

_INSTANCE = {
    "type": "object",
    "properties": dict(
        [(name, {"type": "string"}) for name in ("id", "alias", "type", "status", "url",
                                                   "config")]
        + [("restart", {"type": "boolean"}), ("meta", {"type": "object"})]
        + [(name, {"type": "integer"}) for name in ("mode", "ping", "pool", "tcps", "udps",
                                                     "tcprx", "tcptx", "udprx", "udptx")]),
}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}}


def _operation(path: str, method: str, summary: str) -> dict:
    operation = {"summary": summary,
                 "responses": {"200": {"description": "OK"},
                               "400": {"description": "Bad request", "content": {
                                   "application/json": {"schema": _ERROR}}},
                               "401": {"description": "Unauthorized"}}}
    if path in PUBLIC:
        operation["security"] = []
        operation["responses"] = {"200": {"description": "OK"}}
    if method in ("post", "patch", "put"):
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"type": "object"}}}}
    if path.startswith("/instances") and method != "delete":
        operation["responses"]["200"]["content"] = {"application/json": {"schema": (
            {"type": "array", "items": _INSTANCE} if path == "/instances" and method == "get"
            else _INSTANCE)}}
    if method == "post" and path == "/instances":
        operation["responses"]["201"] = operation["responses"].pop("200")
    if method == "delete":
        operation["responses"]["204"] = {"description": "Deleted"}
        del operation["responses"]["200"]
    if path == "/tcping":
        operation["parameters"] = [{"name": "target", "in": "query", "required": True,
                                    "schema": {"type": "string"}}]
    return operation


def document(prefix: str) -> dict:
    paths = {}  # type: Dict[str, dict]
    for path, methods in ROUTES.items():
        item = {method: _operation(path, method, summary) for method, summary in methods.items()}
        if "{id}" in path:
            item["parameters"] = [{"name": "id", "in": "path", "required": True,
                                   "schema": {"type": "string"}}]
        paths[path] = item
    return {
        "openapi": "3.1.1",
        "info": {"title": "NodePass API (nodepass-gevent)",
                 "description": "API for managing NodePass server and client instances",
                 "version": "v1"},
        "servers": [{"url": prefix}],
        "security": [{"ApiKeyAuth": []}],
        "paths": paths,
        "components": {"securitySchemes": {"ApiKeyAuth": {
            "type": "apiKey", "in": "header", "name": "X-API-Key",
            "description": "API Key for authentication"}}},
    }


def swagger_page(prefix: str) -> bytes:
    """v1.14's /docs: Swagger UI, loaded from a CDN, on this document."""
    return ("""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>NodePass API</title>
<link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "%s/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>
""" % prefix).encode("utf-8")
