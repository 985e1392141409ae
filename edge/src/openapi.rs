//! The API description (`/openapi.json`) and an offline Swagger UI (`/swagger-ui`).
//!
//! The Swagger UI files are vendored from the npm package `swagger-ui-dist` under
//! `edge/assets/swagger-ui/` (Apache-2.0, license and notice alongside) and compiled into the
//! binary, so the page needs no network access beyond the edge itself.

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL};
use http::{Response, StatusCode};

use crate::body::{full, EdgeBody};

/// Version of the vendored `swagger-ui-dist`.
pub const SWAGGER_UI_VERSION: &str = "5.35.0";

static BUNDLE_JS: &[u8] = include_bytes!("../assets/swagger-ui/swagger-ui-bundle.js");
static CSS: &[u8] = include_bytes!("../assets/swagger-ui/swagger-ui.css");

const INDEX_HTML: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tabbify-node API</title>
<link rel="stylesheet" href="/swagger-ui/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/swagger-ui/swagger-ui-bundle.js"></script>
<script>
window.ui = SwaggerUIBundle({ url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true });
</script>
</body>
</html>
"##;

/// The response for a path under `/swagger-ui`, or `None` if there is no such asset.
pub fn swagger_ui(path: &str) -> Option<Response<EdgeBody>> {
    let (content_type, body): (&'static str, Bytes) = match path {
        "/swagger-ui" | "/swagger-ui/" | "/swagger-ui/index.html" => (
            "text/html; charset=utf-8",
            Bytes::from_static(INDEX_HTML.as_bytes()),
        ),
        "/swagger-ui/swagger-ui-bundle.js" => {
            ("application/javascript", Bytes::from_static(BUNDLE_JS))
        }
        "/swagger-ui/swagger-ui.css" => ("text/css", Bytes::from_static(CSS)),
        _ => return None,
    };
    let mut resp = full(StatusCode::OK, content_type, body);
    resp.headers_mut().insert(
        CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    Some(resp)
}

/// The OpenAPI 3.0 document of the edge.
pub fn document() -> serde_json::Value {
    let error = serde_json::json!({
        "description": "Error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    });
    let app_op = |summary: &str| {
        serde_json::json!({
            "summary": summary,
            "description": "Proxied to the app's runner at [app_ula]:8730 with the rest of the path and the query string. Any method; bodies are streamed; WebSocket upgrades and server-sent events pass through. The Authorization header (the edge's key) is not forwarded.",
            "security": [{"bearer": []}],
            "parameters": [{"name": "app", "in": "path", "required": true, "schema": {"type": "string", "format": "uuid"}}],
            "responses": {
                "default": {"description": "The app's response"},
                "400": error, "401": error, "408": error, "429": error, "502": error, "503": error, "504": error
            }
        })
    };
    let mut rest_op = app_op("Proxy a path to an app");
    if let Some(params) = rest_op["parameters"].as_array_mut() {
        params.push(serde_json::json!({"name": "path", "in": "path", "required": true, "description": "The rest of the path (may contain `/`)", "schema": {"type": "string"}}));
    }
    let methods = |op: &serde_json::Value| serde_json::json!({"get": op, "post": op, "put": op, "patch": op, "delete": op, "head": op, "options": op});
    serde_json::json!({
        "openapi": "3.0.3",
        "info": {
            "title": "tabbify-node",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The public edge of the Tabbify mesh: proxies /app/{uuid}/... to app ULAs. Hostnames listed in the routes file are proxied without the key."
        },
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "TABBIFY_NODE_KEY"},
                "metricsKey": {"type": "http", "scheme": "bearer", "description": "The key in --metrics-key-file"}
            },
            "schemas": {
                "Error": {"type": "object", "required": ["error", "message"], "properties": {
                    "error": {"type": "string", "enum": ["bad_app_id", "bad_request", "request_timeout", "too_many_connections", "overloaded", "unauthorized", "not_found", "method_not_allowed", "app_unreachable", "bad_gateway", "app_timeout"]},
                    "message": {"type": "string"}
                }},
                "Route": {"type": "object", "properties": {
                    "host": {"type": "string"}, "prefix": {"type": "string"}, "app": {"type": "string", "format": "uuid"}
                }}
            }
        },
        "paths": {
            "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object", "properties": {"status": {"type": "string"}}}}}}}}},
            "/metrics": {"get": {
                "summary": "Prometheus metrics",
                "description": "Served on the separate metrics listener (--metrics-bind, loopback by default). On this public listener only when --metrics-key-file is set and its key is presented as a bearer token; otherwise 404, like an unknown path.",
                "security": [{"metricsKey": []}],
                "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {}}}, "404": error}
            }},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.0"}}}},
            "/swagger-ui": {"get": {"summary": "Interactive API explorer (offline)", "responses": {"200": {"description": "HTML"}}}},
            "/v1/routes": {"get": {
                "summary": "The active hostname routes",
                "security": [{"bearer": []}],
                "responses": {
                    "200": {"description": "Routes", "content": {"application/json": {"schema": {"type": "object", "properties": {"routes": {"type": "array", "items": {"$ref": "#/components/schemas/Route"}}}}}}},
                    "401": error
                }
            }},
            "/app/{app}": methods(&app_op("Proxy the root path to an app")),
            "/app/{app}/{path}": methods(&rest_op)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_lists_every_endpoint() {
        let doc = document();
        for p in [
            "/health",
            "/metrics",
            "/openapi.json",
            "/swagger-ui",
            "/v1/routes",
            "/app/{app}",
            "/app/{app}/{path}",
        ] {
            assert!(doc["paths"][p].is_object(), "{p} missing");
        }
        assert_eq!(
            doc["paths"]["/app/{app}/{path}"]["post"]["parameters"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert!(doc["paths"]["/metrics"]["get"]["responses"]["404"].is_object());
        let codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"].clone();
        for code in [
            "bad_request",
            "request_timeout",
            "too_many_connections",
            "overloaded",
        ] {
            assert!(
                codes.as_array().unwrap().iter().any(|c| c == code),
                "{code}"
            );
        }
    }

    #[test]
    fn swagger_assets_are_embedded_and_reference_no_cdn() {
        let index = swagger_ui("/swagger-ui").unwrap();
        assert_eq!(index.status(), StatusCode::OK);
        assert!(!INDEX_HTML.contains("http"));
        assert!(BUNDLE_JS.len() > 100_000);
        assert!(swagger_ui("/swagger-ui/swagger-ui.css").is_some());
        assert!(swagger_ui("/swagger-ui/nope.js").is_none());
    }
}
