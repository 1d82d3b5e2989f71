"""One OpenAPI 3.1 document for the whole API at the gateway, and a reference page rendered from it.

The union of the services' published documents, keeping only the operations the gateway routes
(`x-clinic-gateway` not false). Every service names its components alike (`Error`, `NotFound`,
`bearer`), so each component is renamed with its service's prefix (`InboxError`) and every
reference and security requirement follows. A document-wide `security` moves onto each operation
that has none of its own, each operation says its service (`x-clinic-service`) and its tags are the
service's (`inbox/messages`).
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")
INFO = {
    "title": "Clinic Message Board API",
    "version": "1",
    "summary": "Every operation the gateway routes, from every service's published document.",
    "description": (
        "The union of `/api/v1/openapi/<service>.yaml` without the operations only reachable on a "
        "service's own port (`x-clinic-gateway: false`). Component names carry their service's prefix "
        "(`InboxError`); each operation names its service in `x-clinic-service`."
    ),
    "license": {"name": "Proprietary", "identifier": "LicenseRef-Proprietary"},
}


def prefix(service: str) -> str:
    """`auto_reply` -> `AutoReply`: the start of every component name from that service."""
    return "".join(part.capitalize() for part in service.split("_"))


def component_name(service: str, name: str) -> str:
    """`inbox`, `Error` -> `InboxError`; `directory`, `apiKey` -> `DirectoryApiKey`."""
    return prefix(service) + name[:1].upper() + name[1:]


def _rename_refs(node: Any, service: str) -> Any:
    """A copy of `node` with every `#/components/<kind>/<name>` reference renamed for `service`."""
    if isinstance(node, dict):
        copy = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/components/"):
                kind, _, name = value[len("#/components/") :].partition("/")
                copy[key] = f"#/components/{kind}/{component_name(service, name)}"
            else:
                copy[key] = _rename_refs(value, service)
        return copy
    if isinstance(node, list):
        return [_rename_refs(value, service) for value in node]
    return node


def _security(requirements: list[dict], service: str) -> list[dict]:
    return [
        {component_name(service, name): scopes for name, scopes in requirement.items()} for requirement in requirements
    ]


def merge(documents: Mapping[str, bytes]) -> dict:
    """service -> its document (YAML) into one document (a plain dict, ready for JSON)."""
    paths: dict[str, dict] = {}
    components: dict[str, dict] = {}
    tags: list[dict] = []
    for service in sorted(documents):
        raw = yaml.safe_load(documents[service])
        document = _rename_refs(raw, service)
        default_security = raw.get("security")
        service_tags = set()
        for path, item in document.get("paths", {}).items():
            merged_item = {key: value for key, value in item.items() if key not in METHODS}
            for method in METHODS:
                operation = item.get(method)
                if operation is None or operation.get("x-clinic-gateway", True) is False:
                    continue
                operation = dict(operation)
                security = operation.get("security", default_security)
                if security is not None:
                    operation["security"] = _security(security, service)
                operation["tags"] = [f"{service}/{tag}" for tag in operation.get("tags", [])]
                service_tags.update(operation["tags"])
                operation["x-clinic-service"] = service
                merged_item[method] = operation
            if any(method in merged_item for method in METHODS):
                if path in paths:
                    raise ValueError(f"{path} is documented by two services")
                paths[path] = merged_item
        for kind, entries in document.get("components", {}).items():
            for name, value in entries.items():
                merged_name = component_name(service, name)
                if merged_name in components.get(kind, {}):
                    raise ValueError(f"components/{kind}/{merged_name} is named twice")
                components.setdefault(kind, {})[merged_name] = value
        for tag in document.get("tags", []):
            name = f"{service}/{tag['name']}"
            if name in service_tags:
                tags.append({**tag, "name": name})
    return {
        "openapi": "3.1.0",
        "info": INFO,
        "servers": [{"url": "/", "description": "The gateway."}],
        "tags": tags,
        "paths": paths,
        "components": components,
    }


# --- the reference page ------------------------------------------------------------------------


def _resolve(document: dict, node: Any) -> Any:
    """`node` itself, or what its `$ref` names (references inside the document only)."""
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        target: Any = document
        for token in node["$ref"][2:].split("/"):
            target = target[token.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def operations(document: dict) -> Iterator[tuple[str, str, dict, dict]]:
    """(path, method, operation, path item) of every operation, in document order."""
    for path, item in document.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method], item


def _type(schema: Any) -> str:
    if not isinstance(schema, dict):
        return ""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "")
    return " | ".join(kind) if isinstance(kind, list) else str(kind)


def _operation_html(document: dict, path: str, method: str, operation: dict, item: dict) -> list[str]:
    e = html.escape
    anchor = e(operation.get("operationId") or f"{method}-{path}")
    out = [f'<section id="{anchor}">', f"<h3><code>{e(method.upper())} {e(path)}</code></h3>"]
    if operation.get("summary"):
        out.append(f"<p>{e(operation['summary'])}</p>")
    if operation.get("deprecated"):
        out.append("<p><strong>Deprecated.</strong></p>")
    security = operation.get("security")
    if security is not None:
        who = ", ".join(" + ".join(requirement) or "anyone" for requirement in security) or "anyone"
        out.append(f"<p>Security: {e(who)}</p>")
    parameters = [_resolve(document, p) for p in [*item.get("parameters", []), *operation.get("parameters", [])]]
    if parameters:
        out.append("<table><caption>Parameters</caption>")
        out.append("<tr><th>name</th><th>in</th><th>required</th><th>type</th><th>description</th></tr>")
        for parameter in parameters:
            out.append(
                f"<tr><td><code>{e(str(parameter.get('name', '')))}</code></td><td>{e(str(parameter.get('in', '')))}"
                f"</td><td>{'yes' if parameter.get('required') else 'no'}</td>"
                f"<td>{e(_type(parameter.get('schema')))}</td><td>{e(str(parameter.get('description', '')))}</td></tr>"
            )
        out.append("</table>")
    body = _resolve(document, operation.get("requestBody"))
    if isinstance(body, dict) and body.get("content"):
        media = ", ".join(body["content"])
        out.append(f"<p>Request body ({'required' if body.get('required') else 'optional'}): {e(media)}</p>")
    out.append("<table><caption>Responses</caption><tr><th>status</th><th>description</th></tr>")
    for status, answer in operation.get("responses", {}).items():
        response = _resolve(document, answer)
        out.append(f"<tr><td>{e(str(status))}</td><td>{e(str(response.get('description', '')))}</td></tr>")
    out.append("</table>")
    out.append("</section>")
    return out


def reference_page(document: dict) -> str:
    """A self-contained HTML page listing every operation of `document`, grouped by service: no script,
    no style, no link to anything but itself, so the page's Content-Security-Policy holds as it is."""
    e = html.escape
    by_service: dict[str, list[tuple[str, str, dict, dict]]] = {}
    for path, method, operation, item in operations(document):
        by_service.setdefault(operation.get("x-clinic-service", ""), []).append((path, method, operation, item))
    info = document.get("info", {})
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(info.get('title', 'API'))} reference</title></head>",
        "<body>",
        f"<h1>{e(info.get('title', 'API'))}</h1>",
        f'<p>{e(info.get("summary", ""))} The document: <a href="/api/v1/openapi.json">/api/v1/openapi.json</a>.</p>',
        "<nav><ul>",
    ]
    for service, entries in by_service.items():
        out.append(f'<li><a href="#service-{e(service)}">{e(service)}</a> ({len(entries)} operations)</li>')
    out.append("</ul></nav>")
    for service, entries in by_service.items():
        out.append(f'<section id="service-{e(service)}"><h2>{e(service)}</h2>')
        for path, method, operation, item in entries:
            out.extend(_operation_html(document, path, method, operation, item))
        out.append("</section>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
