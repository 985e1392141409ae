//! The OpenAPI 3 description served at `/openapi.json`, written by hand next to the types
//! in [`crate::api`] (the `api` module stays free of schema-generation dependencies).
//! Identity is the client certificate's CN (mutual TLS); without mTLS (loopback
//! development) it is the `x-tabbify-identity` header.
//!
//! Also the offline Swagger UI at `/swagger-ui`: the edge's vendored copy of
//! `swagger-ui-dist` (`edge/assets/swagger-ui/`, Apache-2.0, license alongside) compiled
//! into this binary too, so one copy serves both programs and the page needs no network
//! beyond the coordinator.

use serde_json::{json, Value};

static SWAGGER_JS: &[u8] = include_bytes!("../../edge/assets/swagger-ui/swagger-ui-bundle.js");
static SWAGGER_CSS: &[u8] = include_bytes!("../../edge/assets/swagger-ui/swagger-ui.css");
const SWAGGER_INDEX: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tabbify-mesh-coordinator API</title>
<link rel="stylesheet" href="/swagger-ui/swagger-ui.css">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/swagger-ui/swagger-ui-bundle.js"></script>
<script src="/swagger-ui/init.js"></script>
</body>
</html>
"##;
const SWAGGER_INIT: &str =
    "window.ui = SwaggerUIBundle({ url: \"/openapi.json\", dom_id: \"#swagger-ui\", deepLinking: true });\n";

/// The Swagger UI asset at `path` (under `/swagger-ui`) and its content type, or `None`.
pub fn swagger_ui(path: &str) -> Option<(&'static str, &'static [u8])> {
    match path {
        "/swagger-ui" | "/swagger-ui/" | "/swagger-ui/index.html" => {
            Some(("text/html; charset=utf-8", SWAGGER_INDEX.as_bytes()))
        }
        "/swagger-ui/init.js" => Some(("text/javascript", SWAGGER_INIT.as_bytes())),
        "/swagger-ui/swagger-ui-bundle.js" => Some(("text/javascript", SWAGGER_JS)),
        "/swagger-ui/swagger-ui.css" => Some(("text/css", SWAGGER_CSS)),
        _ => None,
    }
}

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

fn cn_param() -> Value {
    json!({"name": "cn", "in": "path", "required": true,
           "description": "an identity: the CN of a member certificate",
           "schema": {"type": "string"}})
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
    let nat_class = json!({"type": "string", "default": "unknown",
        "enum": ["unknown", "none", "endpoint_independent", "endpoint_dependent", "udp_blocked"]});
    let relay_url = json!({"type": "string", "pattern": "^https://",
        "description": "https://HOST:PORT of a relay (TLS over TCP and UDP on that port); its identity"});
    let relays = json!({"type": "array", "items": {"$ref": "#/components/schemas/RelayInfo"},
        "description": "the relays this mesh offers: the coordinator's own (--relay) first, then each --relay-url"});
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
            "mapped_endpoints": addrs,
            "nat": nat_class,
            "home_relay": {"type": "string", "description": "the peer's home relay URL; absent when it has none"},
            "hosted_app_ulas": ulas,
            "stale": {"type": "boolean", "default": false,
                      "description": "missed its heartbeats; kept (with its apps) until --stale-after"},
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
    let mut doc = json!({
        "openapi": "3.0.3",
        "info": {
            "title": "tabbify-mesh-coordinator",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Control plane of the Tabbify mesh. Callers are identified by the CN of their client certificate (mutual TLS); a member's peer id and ULA derive from that identity, and one WireGuard key is admitted per identity (changed only by rotate-key). Admin routes need a certificate carrying the admin role (URI SAN urn:tabbify:role:admin, from tabbify-mesh-ca issue-admin). Without mTLS (loopback development) the x-tabbify-identity header names the caller and admins are the --admin names. Every error is {\"error\", \"code\"}; refusals by a cap or rate limit are 429 (too_many_streams, rate_limited, too_many_connections) or 503 (overloaded); a heartbeat claiming an app another peer holds is 409 app_taken; a registration or heartbeat that loses a race with another coordinator on the same database (for a token's last use, a key or an app) is 409 conflict and changes nothing; a write the state database fails or cannot take (including a heartbeat that changes the member; an unchanged heartbeat writes nothing) is 503 unavailable and changes nothing."
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
                "parameters": [{"name": "Last-Event-ID", "in": "header", "required": false,
                    "description": "Resume after this event id (with PostgreSQL, a change-log id: valid on any coordinator that saw it); otherwise the stream starts with a snapshot",
                    "schema": {"type": "string"}}],
                "responses": {
                    "200": {"description": "Server-sent events: snapshot, peer_upsert, peer_remove, policy, hole_punch",
                            "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                    "default": error_responses()["default"].clone()
                }}},
            "/v1/relay/token": {"post": {"operationId": "relayToken",
                "description": "A relay admission for the caller: an Ed25519-signed token naming its identity and registered WireGuard key, valid 5 minutes; present it as `authorization: Bearer` in the relay's upgrade request instead of a client certificate (the key-possession proof is still required, for that key).",
                "requestBody": body("RelayTokenRequest"), "responses": ok("RelayTokenResponse")}},
            "/v1/mesh/rotate-key": {"post": {"operationId": "rotateKey",
                "requestBody": body("RotateKeyRequest"), "responses": ok("RotateKeyResponse")}},
            "/v1/mesh/peers/{id}": {"delete": {"operationId": "revokePeer",
                "description": "Revokes the peer's identity (as DELETE /v1/identities/{cn}).",
                "parameters": [peer_id_param()], "responses": ok("RevokeResponse")}},
            "/v1/identities/{cn}": {"delete": {"operationId": "revokeIdentity",
                "description": "Revokes the identity: its peer leaves every roster now and no key or token registers it until it is re-admitted.",
                "parameters": [cn_param()], "responses": ok("IdentityResponse")}},
            "/v1/identities/{cn}/readmit": {"post": {"operationId": "readmitIdentity",
                "description": "Lifts the revocation; the identity's key is cleared, so the node joins again with a new token.",
                "parameters": [cn_param()], "responses": ok("IdentityResponse")}},
            "/v1/identities/{cn}/key": {"delete": {"operationId": "clearIdentityKey",
                "description": "Forgets the key admitted for the identity (the node lost it): the node may join again with a new key and a new token. The old key stays bound to the identity.",
                "parameters": [cn_param()], "responses": ok("IdentityResponse")}},
            "/v1/policy": {
                "get": {"operationId": "getPolicy", "responses": ok("PolicyResponse")},
                "put": {"operationId": "putPolicy", "requestBody": body("PolicyDocument"), "responses": ok("PolicyResponse")}
            },
            "/v1/tokens": {
                "post": {"operationId": "mintToken",
                    "requestBody": body("TokenRequest"), "responses": ok("TokenResponse")},
                "get": {"operationId": "listTokens", "responses": {
                    "200": {"description": "OK (no secrets)", "content": {"application/json": {"schema": {
                        "type": "array", "items": {"$ref": "#/components/schemas/TokenInfo"}}}}},
                    "default": error_responses()["default"].clone()
                }}
            },
            "/v1/tokens/{token_id}": {"delete": {"operationId": "deleteToken",
                "parameters": [{"name": "token_id", "in": "path", "required": true, "schema": {"type": "string"}}],
                "responses": ok("TokenInfo")}},
            "/v1/revocations": {"get": {"operationId": "revocations", "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Revocation"}}}}},
                "default": error_responses()["default"].clone()
            }}},
            "/v1/revocations/{id}": {"delete": {"operationId": "readmitPeer",
                "description": "Re-admits the revoked identity with this peer id.",
                "parameters": [peer_id_param()], "responses": ok("RevokeResponse")}},
            "/v1/apps/{uuid}/move": {"post": {"operationId": "moveApp",
                "description": "Admin: hand the app over to peer `to` in one roster event.",
                "parameters": [{"name": "uuid", "in": "path", "required": true,
                                "schema": {"type": "string", "format": "uuid"}}],
                "requestBody": body("MoveAppRequest"), "responses": ok("MoveAppResponse")}}
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
                    "roster": {"type": "array", "items": {"$ref": "#/components/schemas/RosterEntry"}},
                    "stun_servers": addrs,
                    "relays": relays,
                    "dns_domain": {"type": "string", "default": "mesh",
                        "description": "the mesh DNS domain (--dns-domain): members are <name>.<domain>, apps <uuid>.app.<domain>"}
                }},
            "RelayInfo": {"type": "object", "required": ["url"], "properties": {"url": relay_url}},
            "PathCounts": {"type": "object", "required": ["direct", "relay"],
                "properties": {"direct": {"type": "integer", "minimum": 0, "maximum": 4_294_967_295u64},
                               "relay": {"type": "integer", "minimum": 0, "maximum": 4_294_967_295u64}}},
            "RelayTokenRequest": {"type": "object", "required": ["peer_id"],
                "properties": {"peer_id": {"type": "string"}}},
            "RelayTokenResponse": {"type": "object", "required": ["token", "expires_at", "public_key", "signing_key"],
                "properties": {"token": {"type": "string"}, "expires_at": {"type": "integer", "description": "unix seconds"},
                               "public_key": {"type": "string", "description": "the WireGuard key the token names (base64)"},
                               "signing_key": {"type": "string", "description": "the coordinator's Ed25519 token key (base64)"}}},
            "HeartbeatRequest": {"type": "object", "required": ["peer_id"],
                "properties": {"peer_id": {"type": "string"}, "endpoints": addrs, "hosted_app_ulas": ulas,
                               "mapped_endpoints": addrs, "nat": nat_class,
                               "home_relay": {"type": "string", "nullable": true,
                                              "description": "one of the advertised relay URLs, else 400"},
                               "paths": {"$ref": "#/components/schemas/PathCounts"}}},
            "HeartbeatResponse": {"type": "object", "required": ["heartbeat_interval_secs", "reflexive_endpoint"],
                "properties": {"heartbeat_interval_secs": {"type": "integer"}, "reflexive_endpoint": {"type": "string"},
                               "stun_servers": addrs, "relays": relays}},
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
                               "max_uses": {"type": "integer", "minimum": 0, "maximum": 4_294_967_295u64,
                                            "description": "0 = unlimited, only with unlimited: true"},
                               "unlimited": {"type": "boolean"},
                               "identity": {"type": "string", "description": "bind the token to this certificate CN"}}},
            "TokenResponse": {"type": "object", "required": ["token", "token_id", "tags", "expires_at", "max_uses"],
                "properties": {"token": {"type": "string"}, "token_id": {"type": "string"}, "tags": strings,
                               "name": {"type": "string"}, "expires_at": {"type": "integer"},
                               "max_uses": {"type": "integer"}, "identity": {"type": "string"}}},
            "TokenInfo": {"type": "object",
                "required": ["token_id", "tags", "created_at", "expires_at", "max_uses", "uses"],
                "properties": {"token_id": {"type": "string"}, "tags": strings,
                               "name": {"type": "string"}, "identity": {"type": "string"},
                               "created_at": {"type": "integer"}, "expires_at": {"type": "integer"},
                               "max_uses": {"type": "integer"}, "uses": {"type": "integer"}}},
            "RotateKeyRequest": {"type": "object", "required": ["peer_id", "old_public_key", "new_public_key"],
                "properties": {"peer_id": {"type": "string"},
                               "old_public_key": {"type": "string", "description": "base64 of 32 bytes"},
                               "new_public_key": {"type": "string", "description": "base64 of 32 bytes"}}},
            "RotateKeyResponse": {"type": "object", "required": ["peer_id", "ula", "public_key", "key_since"],
                "properties": {"peer_id": {"type": "string"}, "ula": {"type": "string"},
                               "public_key": {"type": "string"}, "key_since": {"type": "integer"}}},
            "IdentityResponse": {"type": "object", "required": ["identity", "peer_id", "ula", "revoked"],
                "properties": {"identity": {"type": "string"}, "peer_id": {"type": "string"},
                               "ula": {"type": "string"}, "revoked": {"type": "boolean"},
                               "public_key": {"type": "string"}}},
            "MoveAppRequest": {"type": "object", "required": ["to"], "additionalProperties": false,
                "properties": {"to": {"type": "string", "description": "peer id"}}},
            "MoveAppResponse": {"type": "object", "required": ["app_ula", "to"],
                "properties": {"app_ula": {"type": "string"}, "from": {"type": "string"},
                               "to": {"type": "string"}}},
            "RevokeResponse": {"type": "object", "required": ["peer_id", "revoked"],
                "properties": {"peer_id": {"type": "string"}, "revoked": {"type": "boolean"}}},
            "Revocation": {"type": "object", "required": ["peer_id", "public_key", "revoked_at"],
                "properties": {"peer_id": {"type": "string"}, "identity": {"type": "string"},
                               "public_key": {"type": "string"}, "revoked_at": {"type": "integer"}}}
        }}
    });
    // The leave route and the ephemeral flag are set apart: the literal above is at the
    // `json!` macro's recursion limit.
    doc["paths"]["/v1/mesh/leave"] = json!({"post": {"operationId": "leave",
        "description": "The caller (its certificate's identity; the body is {} and names nobody: any field is 400) leaves the mesh: it is removed from every roster at once (peer_remove, reason `left`) and its streams close. Its key stays admitted, so it may register again without a token. 404 not_registered when this coordinator holds no member for the caller.",
        "requestBody": body("LeaveRequest"), "responses": ok("LeaveResponse")}});
    let schemas = &mut doc["components"]["schemas"];
    schemas["RegisterRequest"]["properties"]["ephemeral"] = json!({"type": "boolean", "default": false,
        "description": "Removed from every roster as soon as it misses its heartbeats (no stale window); the joiner leaves when stopped cleanly."});
    schemas["LeaveRequest"] =
        json!({"type": "object", "additionalProperties": false, "properties": {}});
    schemas["LeaveResponse"] = json!({"type": "object", "required": ["peer_id", "left"],
        "properties": {"peer_id": {"type": "string"}, "left": {"type": "boolean"}}});
    routes(&mut doc);
    clients(&mut doc);
    dashboard(&mut doc);
    doc
}

/// Stock WireGuard clients through a concentrator (`crate::clients`).
fn clients(doc: &mut Value) {
    let id = json!({"name": "id", "in": "path", "required": true,
        "description": "a client's peer id (or its display name)", "schema": {"type": "string"}});
    let mut created = error_responses();
    created["201"] = json!({"description": "Created",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClientCreateResponse"}}}});
    let paths = &mut doc["paths"];
    paths["/v1/clients"] = json!({
        "post": {"operationId": "createClient",
            "description": "Admin: mint a stock WireGuard client served by a concentrator (a member registered with concentrator: true). The coordinator generates the key pair and keeps only the public key: the private key is in `config` (the wg-quick file) and `qr_png` only. 400 naming the field (name, tags, concentrator, endpoint); 409 when the name is a member's or client's already.",
            "requestBody": body("ClientCreateRequest"), "responses": created},
        "get": {"operationId": "listClients",
            "description": "Admin: every client (no secrets), by display name.",
            "responses": ok("ClientsResponse")}
    });
    paths["/v1/clients/{id}"] = json!({
        "delete": {"operationId": "revokeClient",
            "description": "Admin: revoke the client: it leaves every roster (peer_remove, reason revoked) and its concentrator drops its key. 404 for an unknown client.",
            "parameters": [id], "responses": ok("ClientInfo")}
    });
    let schemas = &mut doc["components"]["schemas"];
    let flag = json!({"type": "boolean", "default": false,
        "description": "this member serves stock WireGuard clients (join --concentrator)"});
    for req in ["RegisterRequest", "HeartbeatRequest"] {
        schemas[req]["properties"]["concentrator"] = flag.clone();
    }
    let entry = &mut schemas["RosterEntry"]["properties"];
    let ports = entry["ports"].clone();
    entry["via"] = json!({"type": "string",
        "description": "the entry is a client reached through the concentrator with this peer id"});
    entry["client"] = json!({"type": "boolean", "default": false,
        "description": "in a concentrator's own roster: a client it serves (a WireGuard peer without endpoint)"});
    entry["client_ports"] = json!({"type": "array",
        "description": "in a concentrator's roster, on a member entry: the port rules between the member and each client its may_use names (outbound: ports on the client the member may open); absent from older coordinators, then the concentrator gives the member only reply grants",
        "items": {"type": "object", "required": ["client", "ports"],
            "properties": {"client": {"type": "string"},
                           "ports": ports}}});
    let tag =
        json!({"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9._-]+$"});
    schemas["ClientCreateRequest"] = json!({"type": "object", "additionalProperties": false,
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9._-]+$"},
            "tags": {"type": "array", "maxItems": 16, "items": tag},
            "concentrator": {"type": "string", "description": "peer id or display name; absent: the only concentrator"},
            "endpoint": {"type": "string", "description": "HOST:PORT for the file; absent: the concentrator's reflexive endpoint"},
            "dns": {"type": "boolean", "default": true, "description": "write the DNS line (the concentrator's mesh DNS stub)"}}});
    schemas["ClientInfo"] = json!({"type": "object",
        "required": ["id", "identity", "display_name", "tags", "ula", "ipv4", "public_key", "concentrator", "created_at"],
        "properties": {"id": {"type": "string"}, "identity": {"type": "string"},
            "display_name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
            "ula": {"type": "string"}, "ipv4": {"type": "string"}, "public_key": {"type": "string"},
            "concentrator": {"type": "string"}, "created_at": {"type": "integer", "minimum": 0}}});
    schemas["ClientCreateResponse"] = json!({"type": "object", "required": ["client", "config", "qr_png"],
        "properties": {"client": {"$ref": "#/components/schemas/ClientInfo"},
            "config": {"type": "string", "description": "the wg-quick file, private key included (shown once)"},
            "qr_png": {"type": "string", "description": "standard base64 of a PNG of the QR code of config"}}});
    schemas["ClientsResponse"] = json!({"type": "object", "required": ["clients"],
        "properties": {"clients": {"type": "array", "items": {"$ref": "#/components/schemas/ClientInfo"}}}});
}

/// Subnet routes, exit nodes and the mesh IPv4 (`crate::routes`).
fn routes(doc: &mut Value) {
    let prefixes = json!({"type": "array", "items": {"type": "string",
        "description": "a canonical IP prefix, host bits zero: 10.1.0.0/16, fd00:1::/64"}});
    let advertise = json!({"type": "array", "maxItems": 64, "items": {"type": "string"},
        "description": "prefixes this member routes to (canonical, host bits zero); mesh space (fd5a:1f00::/24, 100.64.0.0/10), loopback, link-local, multicast and default routes are refused (400)"});
    let exit = json!({"type": "boolean", "default": false,
        "description": "offer this member as an exit node (0.0.0.0/0 and ::/0)"});
    let state = json!({"type": "string", "enum": ["approved", "pending"]});
    let route_id = json!({"name": "id", "in": "path", "required": true,
        "description": "a route id from GET /v1/routes", "schema": {"type": "string"}});
    let paths = &mut doc["paths"];
    paths["/v1/routes"] = json!({"get": {"operationId": "listRoutes",
        "description": "Admin: every route advertisement with its state and who approved it.",
        "responses": ok("RoutesResponse")}});
    paths["/v1/routes/{id}/approve"] = json!({
        "post": {"operationId": "approveRoute",
            "description": "Admin: approve the advertisement (durable; reaches every coordinator's streams). 404 for an unknown id.",
            "parameters": [route_id.clone()], "responses": ok("RoutesResponse")},
        "delete": {"operationId": "withdrawRouteApproval",
            "description": "Admin: withdraw an admin approval (the policy's own approval stays).",
            "parameters": [route_id], "responses": ok("RoutesResponse")}
    });
    let schemas = &mut doc["components"]["schemas"];
    for req in ["RegisterRequest", "HeartbeatRequest"] {
        schemas[req]["properties"]["advertise_routes"] = advertise.clone();
        schemas[req]["properties"]["advertise_exit_node"] = exit.clone();
    }
    schemas["HeartbeatRequest"]["properties"]["traffic"] =
        json!({"$ref": "#/components/schemas/TrafficReport"});
    schemas["TrafficReport"] = json!({"type": "object", "required": ["rx_bytes", "tx_bytes"],
        "description": "the member's own claims about its traffic; kept in memory, shown as reported by the member",
        "properties": {"rx_bytes": {"type": "integer", "minimum": 0, "description": "since the joiner started"},
                       "tx_bytes": {"type": "integer", "minimum": 0, "description": "since the joiner started"},
                       "peers": {"type": "array", "maxItems": tabbify_api::MAX_TRAFFIC_PEERS,
                                 "description": "the busiest first; more than maxItems: 400 naming traffic.peers; ids the reporter may not see are dropped",
                                 "items": {"$ref": "#/components/schemas/PeerTraffic"}}}});
    schemas["PeerTraffic"] = json!({"type": "object", "required": ["peer_id", "rx_bytes", "tx_bytes", "path"],
        "properties": {"peer_id": {"type": "string"},
                       "rx_bytes": {"type": "integer", "minimum": 0}, "tx_bytes": {"type": "integer", "minimum": 0},
                       "last_handshake_secs": {"type": "integer", "minimum": 0, "nullable": true,
                                               "description": "age of the last handshake; absent: never"},
                       "path": {"type": "string", "enum": ["direct", "relay", "none"]}}});
    schemas["RegisterResponse"]["properties"]["ipv4"] = json!({"type": "string",
        "description": "the member's mesh IPv4 in 100.64.0.0/10; absent from older coordinators"});
    schemas["RegisterResponse"]["properties"]["routes"] = json!({"type": "array",
        "items": {"$ref": "#/components/schemas/RouteState"}});
    let entry = &mut schemas["RosterEntry"]["properties"];
    entry["ipv4"] = json!({"type": "string", "description": "the peer's mesh IPv4"});
    entry["routes"] = prefixes.clone();
    entry["exit_node"] = json!({"type": "boolean", "default": false,
        "description": "an approved exit node the viewer may use"});
    entry["may_use"] = prefixes;
    schemas["PolicyDocument"]["properties"]["routes"] = json!({"type": "object",
        "additionalProperties": {"type": "array", "items": {"type": "string"}},
        "description": "prefix -> selectors whose advertisements of it (or of a prefix inside it) are approved"});
    schemas["RouteState"] = json!({"type": "object", "required": ["prefix", "state"],
        "properties": {"prefix": {"type": "string"}, "exit_node": {"type": "boolean"},
                       "state": state.clone()}});
    schemas["RouteInfo"] = json!({"type": "object",
        "required": ["id", "peer_id", "display_name", "prefix", "state", "approved_by"],
        "properties": {"id": {"type": "string"}, "peer_id": {"type": "string"},
                       "display_name": {"type": "string"}, "prefix": {"type": "string"},
                       "exit_node": {"type": "boolean"}, "state": state,
                       "approved_by": {"type": "string", "enum": ["policy", "admin"], "nullable": true}}});
    schemas["RoutesResponse"] = json!({"type": "object", "required": ["routes"],
        "properties": {"routes": {"type": "array", "items": {"$ref": "#/components/schemas/RouteInfo"}}}});
}

/// The dashboard's routes: the policy tester, login links, the session, the admin views
/// and stream, and the open pages.
fn dashboard(doc: &mut Value) {
    let html = |what: &str| {
        json!({"200": {"description": what, "content": {"text/html": {"schema": {"type": "string"}}}},
               "default": error_responses()["default"].clone()})
    };
    let paths = &mut doc["paths"];
    paths["/v1/policy/test"] = json!({"post": {"operationId": "testPolicy",
        "description": "Admin: may member `src` open `proto`/`port` on member `dst` under the policy in force, and which rule decides (the same evaluation as the rosters and the data-plane filters). Members are named by peer id, identity, display name or ULA; an unknown one is 404, an ambiguous name 409.",
        "requestBody": body("PolicyTestRequest"), "responses": ok("PolicyTestResponse")}});
    paths["/v1/admin/login-links"] = json!({"post": {"operationId": "mintLoginLink",
        "description": "Admin certificate only (a dashboard session is 403): a one-time login link for the dashboard, valid ttl_secs (default 600, at most 3600). Opening it once sets the session cookie.",
        "requestBody": body("LoginLinkRequest"), "responses": ok("LoginLinkResponse")}});
    paths["/v1/admin/session"] = json!({
        "get": {"operationId": "getSession",
            "description": "The dashboard session of the request's cookie, with its CSRF token; 404 without a session.",
            "responses": ok("AdminSession")},
        "delete": {"operationId": "logout",
            "description": "Ends the dashboard session (needs x-csrf-token); its cookie is refused from then on. 404 without a session.",
            "responses": ok("AdminSession")}});
    paths["/v1/admin/members"] = json!({"get": {"operationId": "adminMembers",
        "description": "Admin: every member with tags, ULA, NAT class, path counts, last seen, staleness and its latest traffic report (reported by the member).",
        "responses": ok("AdminMembersResponse")}});
    paths["/v1/admin/reach"] = json!({"get": {"operationId": "adminReach",
        "description": "Admin: who may reach whom under the policy, per class of members the policy treats alike.",
        "responses": ok("ReachResponse")}});
    paths["/v1/admin/stream"] = json!({"get": {"operationId": "adminStream",
        "description": "Admin: server-sent events `member` (an AdminMember that changed), `member_remove` ({peer_id}), `traffic` (a TrafficEvent: a member's new traffic report, at most one per member per half heartbeat interval), `policy` ({revision}) and `resync` (refetch /v1/admin/members), each with the event id; keepalive comments.",
        "responses": {"200": {"description": "Server-sent events",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                      "default": error_responses()["default"].clone()}}});
    paths["/ui/"] = json!({"get": {"operationId": "dashboard",
        "description": "The dashboard (open; its data needs an admin session).", "responses": html("HTML")}});
    paths["/ui/login"] = json!({"get": {"operationId": "login",
        "description": "Spends a login link: 303 to /ui/ with the session cookie (Secure, HttpOnly, SameSite=Strict); a used, expired or unknown link is 401.",
        "parameters": [{"name": "link", "in": "query", "required": true, "schema": {"type": "string"}}],
        "responses": {"303": {"description": "Logged in; redirect to /ui/"},
                      "default": error_responses()["default"].clone()}}});
    paths["/swagger-ui"] = json!({"get": {"operationId": "swaggerUi",
        "description": "Interactive API explorer (offline, open).", "responses": html("HTML")}});
    let strings = json!({"type": "array", "items": {"type": "string"}});
    let schemas = &mut doc["components"]["schemas"];
    schemas["PolicyTestRequest"] = json!({"type": "object", "additionalProperties": false,
        "required": ["src", "dst", "proto", "port"],
        "properties": {"src": {"type": "string"}, "dst": {"type": "string"},
                       "proto": {"type": "string", "enum": ["tcp", "udp"]},
                       "port": {"type": "integer", "minimum": 0, "maximum": 65535}}});
    schemas["PolicyTestResponse"] = json!({"type": "object",
        "required": ["allowed", "rule", "reason", "src_peer_id", "dst_peer_id", "policy_revision"],
        "properties": {"allowed": {"type": "boolean"},
                       "rule": {"nullable": true, "allOf": [{"$ref": "#/components/schemas/RuleRef"}]},
                       "reason": {"type": "string"}, "src_peer_id": {"type": "string"},
                       "dst_peer_id": {"type": "string"}, "policy_revision": {"type": "integer"}}});
    schemas["RuleRef"] = json!({"type": "object", "required": ["kind", "index", "rule"],
        "properties": {"kind": {"type": "string", "enum": ["allow", "deny"]},
                       "index": {"type": "integer"},
                       "rule": {"$ref": "#/components/schemas/PolicyRule"}}});
    schemas["LoginLinkRequest"] = json!({"type": "object", "additionalProperties": false,
        "properties": {"ttl_secs": {"type": "integer", "minimum": 1, "maximum": 3600, "nullable": true}}});
    schemas["LoginLinkResponse"] = json!({"type": "object", "required": ["path", "link", "expires_at"],
        "properties": {"path": {"type": "string"}, "link": {"type": "string"},
                       "expires_at": {"type": "integer"}}});
    schemas["AdminSession"] = json!({"type": "object", "required": ["admin", "csrf_token", "expires_at"],
        "properties": {"admin": {"type": "string"}, "csrf_token": {"type": "string"},
                       "expires_at": {"type": "integer"}}});
    schemas["AdminMember"] = json!({"type": "object",
        "required": ["peer_id", "identity", "display_name", "ula", "tags", "nat", "paths",
                     "endpoints", "hosted_app_ulas", "last_seen_ms", "stale"],
        "properties": {"peer_id": {"type": "string"}, "identity": {"type": "string"},
                       "display_name": {"type": "string"}, "ula": {"type": "string"},
                       "tags": strings.clone(), "nat": {"type": "string"},
                       "paths": {"$ref": "#/components/schemas/PathCounts"},
                       "home_relay": {"type": "string"},
                       "endpoints": strings.clone(), "hosted_app_ulas": strings.clone(),
                       "last_seen_ms": {"type": "integer"}, "stale": {"type": "boolean"},
                       "traffic": {"$ref": "#/components/schemas/ReportedTraffic"}}});
    schemas["ReportedTraffic"] = json!({"type": "object",
        "description": "a member's latest TrafficReport as this coordinator holds it (memory only): the member's own claims",
        "allOf": [{"$ref": "#/components/schemas/TrafficReport"}],
        "required": ["reported_ms"],
        "properties": {"reported_ms": {"type": "integer", "description": "when it arrived, ms since the epoch; handshake ages are as of then"}}});
    schemas["TrafficEvent"] = json!({"type": "object", "required": ["peer_id", "traffic"],
        "properties": {"peer_id": {"type": "string"},
                       "traffic": {"$ref": "#/components/schemas/ReportedTraffic"}}});
    schemas["AdminMembersResponse"] = json!({"type": "object",
        "required": ["event_id", "policy_revision", "members"],
        "properties": {"event_id": {"type": "integer"}, "policy_revision": {"type": "integer"},
                       "members": {"type": "array", "items": {"$ref": "#/components/schemas/AdminMember"}}}});
    schemas["ReachResponse"] = json!({"type": "object", "required": ["policy_revision", "classes", "edges"],
        "properties": {"policy_revision": {"type": "integer"},
            "classes": {"type": "array", "items": {"type": "object", "required": ["id", "label", "members"],
                "properties": {"id": {"type": "integer"}, "label": {"type": "string"}, "members": strings}}},
            "edges": {"type": "array", "items": {"type": "object", "required": ["from", "to", "ports"],
                "properties": {"from": {"type": "integer"}, "to": {"type": "integer"},
                               "ports": {"type": "string"}}}}}});
}
