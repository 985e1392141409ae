//! The OpenAPI 3 description served at `/openapi.json`, written by hand next to the types
//! in [`crate::api`] (the `api` module stays free of schema-generation dependencies).
//! Identity is the client certificate's CN (mutual TLS); without mTLS (loopback
//! development) it is the `x-tabbify-identity` header.

use serde_json::{json, Value};

fn error_responses() -> Value {
    json!({
        "default": {
            "description": "Error",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
        }
    })
}

fn ok(schema: &str) -> Value {
    let mut r = error_responses();
    r["200"] = json!({
        "description": "OK",
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    });
    r
}

fn body(schema: &str) -> Value {
    json!({
        "required": true,
        "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{schema}")}}}
    })
}

fn peer_id_param() -> Value {
    json!({"name": "id", "in": "path", "required": true, "schema": {"type": "string"}})
}

/// The document.
pub fn document() -> Value {
    let port_range = json!({
        "type": "object", "required": ["first", "last"],
        "properties": {
            "first": {"type": "integer", "minimum": 0, "maximum": 65535},
            "last": {"type": "integer", "minimum": 0, "maximum": 65535}
        }
    });
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let addrs = json!({"type": "array", "items": {"type": "string", "description": "ip:port"}});
    let ulas = json!({"type": "array", "items": {"type": "string", "description": "IPv6 address"}});
    let rule = json!({
        "type": "object", "required": ["src", "dst"], "additionalProperties": false,
        "properties": {"src": strings, "dst": strings}
    });
    let roster_entry = json!({
        "type": "object",
        "required": ["peer_id", "identity", "ula", "display_name", "tags", "public_key",
                     "endpoints", "reflexive_endpoint", "hosted_app_ulas", "ports"],
        "properties": {
            "peer_id": {"type": "string"},
            "identity": {"type": "string"},
            "ula": {"type": "string"},
            "display_name": {"type": "string"},
            "tags": strings,
            "public_key": {"type": "string"},
            "endpoints": addrs,
            "reflexive_endpoint": {"type": "string"},
            "hosted_app_ulas": ulas,
            "ports": {
                "type": "object", "required": ["outbound", "inbound"],
                "properties": {
                    "outbound": {"type": "array", "items": {"$ref": "#/components/schemas/PortRange"},
                        "description": "ports on this peer the viewer may open, TCP and UDP"},
                    "inbound": {"type": "array", "items": {"$ref": "#/components/schemas/PortRange"},
                        "description": "ports on the viewer this peer may open, TCP and UDP"},
                    "outbound_tcp": {"type": "array", "items": {"$ref": "#/components/schemas/PortRange"},
                        "description": "TCP only; absent when empty"},
                    "outbound_udp": {"type": "array", "items": {"$ref": "#/components/schemas/PortRange"},
                        "description": "UDP only; absent when empty"},
                    "inbound_tcp": {"type": "array", "items": {"$ref": "#/components/schemas/PortRange"},
                        "description": "TCP only; absent when empty"},
                    "inbound_udp": {"type": "array", "items": {"$ref": "#/components/schemas/PortRange"},
                        "description": "UDP only; absent when empty"}
                }
            }
        }
    });
    let policy = json!({
        "type": "object", "additionalProperties": false,
        "properties": {
            "tags": strings,
            "groups": {"type": "object", "additionalProperties": strings},
            "app_hosts": strings,
            "allow": {"type": "array", "items": {"$ref": "#/components/schemas/PolicyRule"}},
            "deny": {"type": "array", "items": {"$ref": "#/components/schemas/PolicyRule"}}
        }
    });
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "tabbify-mesh-coordinator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of the Tabbify mesh. Callers are identified by the CN of their client certificate (mutual TLS); admin routes need an admin CN. Without mTLS (loopback development) the x-tabbify-identity header names the caller."
        },
        "paths": {
            "/health": {"get": {"operationId": "health", "responses": ok("Health")}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}
            }}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": {
                "200": {"description": "This document", "content": {"application/json": {"schema": {"type": "object"}}}}
            }}},
            "/v1/mesh/register": {"post": {"operationId": "register",
                "requestBody": body("RegisterRequest"), "responses": ok("RegisterResponse")}},
            "/v1/mesh/heartbeat": {"post": {"operationId": "heartbeat",
                "requestBody": body("HeartbeatRequest"), "responses": ok("HeartbeatResponse")}},
            "/v1/mesh/peers": {"get": {"operationId": "peers", "responses": ok("PeersResponse")}},
            "/v1/mesh/peers/stream": {"get": {"operationId": "peersStream",
                "parameters": [{"name": "Last-Event-ID", "in": "header", "required": false, "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "Server-sent events: snapshot, peer_upsert, peer_remove, policy, hole_punch",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "default": error_responses()["default"].clone()
                }}},
            "/v1/mesh/peers/{id}": {"delete": {"operationId": "revokePeer",
                "parameters": [peer_id_param()], "responses": ok("RevokeResponse")}},
            "/v1/policy": {
                "get": {"operationId": "getPolicy", "responses": ok("PolicyResponse")},
                "put": {"operationId": "putPolicy", "requestBody": body("PolicyDocument"), "responses": ok("PolicyResponse")}
            },
            "/v1/tokens": {"post": {"operationId": "mintToken",
                "requestBody": body("TokenRequest"), "responses": ok("TokenResponse")}},
            "/v1/revocations": {"get": {"operationId": "revocations", "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Revocation"}}}}},
                "default": error_responses()["default"].clone()
            }}},
            "/v1/revocations/{id}": {"delete": {"operationId": "readmitPeer",
                "parameters": [peer_id_param()], "responses": ok("RevokeResponse")}}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error", "code"],
                      "properties": {"error": {"type": "string"}, "code": {"type": "string"}}},
            "Health": {"type": "object", "required": ["status", "peers", "policy_revision"],
                       "properties": {"status": {"type": "string"}, "peers": {"type": "integer"},
                                      "policy_revision": {"type": "integer"}}},
            "PortRange": port_range,
            "RosterEntry": roster_entry,
            "RegisterRequest": {"type": "object", "required": ["name", "public_key", "wg_listen_port"],
                "properties": {
                    "name": {"type": "string"},
                    "public_key": {"type": "string", "description": "base64 of 32 bytes"},
                    "tags": strings,
                    "wg_listen_port": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "endpoints": addrs,
                    "join_token": {"type": "string", "nullable": true}
                }},
            "RegisterResponse": {"type": "object",
                "required": ["peer_id", "ula", "display_name", "tags", "may_host_apps",
                             "reflexive_endpoint", "heartbeat_interval_secs", "roster"],
                "properties": {
                    "peer_id": {"type": "string"}, "ula": {"type": "string"},
                    "display_name": {"type": "string"}, "tags": strings,
                    "may_host_apps": {"type": "boolean"},
                    "reflexive_endpoint": {"type": "string"},
                    "heartbeat_interval_secs": {"type": "integer"},
                    "roster": {"type": "array", "items": {"$ref": "#/components/schemas/RosterEntry"}}
                }},
            "HeartbeatRequest": {"type": "object", "required": ["peer_id"],
                "properties": {"peer_id": {"type": "string"}, "endpoints": addrs, "hosted_app_ulas": ulas}},
            "HeartbeatResponse": {"type": "object", "required": ["heartbeat_interval_secs", "reflexive_endpoint"],
                "properties": {"heartbeat_interval_secs": {"type": "integer"}, "reflexive_endpoint": {"type": "string"}}},
            "PeersResponse": {"type": "object", "required": ["event_id", "peers"],
                "properties": {"event_id": {"type": "integer"},
                               "peers": {"type": "array", "items": {"$ref": "#/components/schemas/RosterEntry"}}}},
            "PolicyRule": rule,
            "PolicyDocument": policy,
            "PolicyResponse": {"type": "object", "required": ["revision", "policy"],
                "properties": {"revision": {"type": "integer"}, "policy": {"$ref": "#/components/schemas/PolicyDocument"}}},
            "TokenRequest": {"type": "object",
                "properties": {"tags": strings, "name": {"type": "string"},
                               "ttl_secs": {"type": "integer", "minimum": 1, "maximum": 2_592_000},
                               "max_uses": {"type": "integer", "minimum": 0, "maximum": 4_294_967_295u64}}},
            "TokenResponse": {"type": "object", "required": ["token", "token_id", "tags", "expires_at", "max_uses"],
                "properties": {"token": {"type": "string"}, "token_id": {"type": "string"}, "tags": strings,
                               "name": {"type": "string"}, "expires_at": {"type": "integer"},
                               "max_uses": {"type": "integer"}}},
            "RevokeResponse": {"type": "object", "required": ["peer_id", "revoked"],
                "properties": {"peer_id": {"type": "string"}, "revoked": {"type": "boolean"}}},
            "Revocation": {"type": "object", "required": ["peer_id", "public_key", "revoked_at"],
                "properties": {"peer_id": {"type": "string"}, "public_key": {"type": "string"},
                               "revoked_at": {"type": "integer"}}}
        }}
    })
}
