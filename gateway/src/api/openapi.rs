//! The OpenAPI 3.1 description of the API, served at `/api/v1/openapi.json`.
//! Written by hand beside the handlers; the API tests check every route listed here answers.

use serde_json::{json, Value};

/// Paths the document lists (the tests walk them).
#[cfg_attr(not(test), allow(dead_code))]
pub const PATHS: &[&str] = &[
    "/api/v1/health",
    "/api/v1/devices",
    "/api/v1/devices/{id}",
    "/api/v1/devices/{id}/readings",
    "/api/v1/quarantine",
    "/api/v1/incidents",
    "/api/v1/incidents/{id}",
    "/api/v1/rules",
    "/api/v1/notify",
    "/api/v1/silences",
    "/api/v1/openapi.json",
    "/metrics",
];

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

pub fn document() -> Value {
    let incident = json!({ "name": "id", "in": "path", "required": true, "description": "Incident id (inc-…).", "schema": { "type": "string" } });
    let id = json!({ "name": "id", "in": "path", "required": true, "description": "Device id, unique across the deployment.", "schema": { "type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$" } });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Citywatch gateway API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Devices, sensor health, readings, quarantine, incidents and their closed loop, rules and push channels of the Citywatch gateway. Errors are JSON {\"error\": \"…\"}." },
        "paths": {
            "/api/v1/health": { "get": { "summary": "Gateway liveness, queue depths and store counters.",
                "responses": { "200": { "description": "Running." } } } },
            "/api/v1/devices": { "get": { "summary": "Registered devices with derived health.",
                "parameters": [
                    query("site", "Only this site.", json!({ "type": "string" })),
                    query("kind", "Only this kind.", json!({ "enum": ["gas_detector", "smoke_detector", "siren_mount"] })),
                    query("health", "Only devices with this health condition.", json!({ "enum": ["online", "offline", "stale", "low_battery", "stuck", "clock_skew", "faulted"] })),
                ],
                "responses": { "200": { "description": "count, by_health and devices." }, "400": error_response("A bad filter.") } } },
            "/api/v1/devices/{id}": { "get": { "summary": "One device.", "parameters": [id.clone()],
                "responses": { "200": { "description": "The device." }, "404": error_response("Unknown device.") } } },
            "/api/v1/devices/{id}/readings": { "get": { "summary": "Readings of one metric, raw or downsampled.",
                "parameters": [ id,
                    json!({ "name": "metric", "in": "query", "required": true, "schema": { "type": "string" }, "description": "A metric of the contract, e.g. gas_lel." }),
                    query("from", "RFC 3339 or epoch ms; default: an hour before `to`.", json!({ "type": "string" })),
                    query("to", "RFC 3339 or epoch ms; default: now.", json!({ "type": "string" })),
                    query("step", "Bucket size (1m, 30s, or ms): one point per bucket with min/max/avg/last/count. Steps of a minute or more come from 1-minute rollups.", json!({ "type": "string" })),
                    query("limit", "Most raw points (default and maximum 10000).", json!({ "type": "integer" })),
                ],
                "responses": { "200": { "description": "points" }, "400": error_response("Bad parameters."), "404": error_response("Unknown device.") } } },
            "/api/v1/quarantine": { "get": { "summary": "Rejected input, newest first, with raw bytes and counts by reason.",
                "parameters": [ query("limit", "At most this many entries (1–1000, default 100).", json!({ "type": "integer" })),
                                query("before", "Entries with an id below this (paging).", json!({ "type": "integer" })) ],
                "responses": { "200": { "description": "counts and entries" } } } },
            "/api/v1/incidents": { "get": { "summary": "Incidents, most recently updated first, with counts by state.",
                "parameters": [
                    query("state", "open, acknowledged, dispatched, resolved, cleared, closed, or active (the first three); comma-separated.", json!({ "type": "string" })),
                    query("rule", "Only this rule.", json!({ "type": "string" })),
                    query("site", "Only this site.", json!({ "type": "string" })),
                    query("device", "Only this device.", json!({ "type": "string" })),
                    query("limit", "At most this many (1–1000, default 200).", json!({ "type": "integer" })),
                ],
                "responses": { "200": { "description": "count, by_state, incidents" }, "400": error_response("A bad filter.") } } },
            "/api/v1/incidents/{id}": { "get": { "summary": "One incident with its full history.",
                "parameters": [incident.clone()],
                "responses": { "200": { "description": "The incident." }, "404": error_response("Unknown incident.") } } },
            "/api/v1/incidents/{id}/{action}": { "post": { "summary": "The closed loop: ack (open→acknowledged), dispatch (to a crew), resolve, close (resolved or cleared→closed). Answers after the change is committed and queued for every push channel.",
                "parameters": [incident, json!({ "name": "action", "in": "path", "required": true, "schema": { "enum": ["ack", "dispatch", "resolve", "close"] } })],
                "requestBody": { "content": { "application/json": { "schema": { "type": "object", "required": ["actor"],
                    "properties": { "actor": { "type": "string" }, "note": { "type": "string" }, "crew": { "type": "string", "description": "Required to dispatch." } } } } } },
                "responses": { "200": { "description": "The incident after the transition." }, "400": error_response("Missing actor or crew."),
                               "404": error_response("Unknown incident or action."), "409": error_response("Not allowed from the incident's state.") } } },
            "/api/v1/events": { "get": { "summary": "Server-Sent Events: every incident change as `event: incident` with `id:` its outbox position; send Last-Event-ID to catch up after a reconnect.",
                "responses": { "200": { "description": "text/event-stream" } } } },
            "/api/v1/rules": { "get": { "summary": "The rule pack, or with ?device= the rules in effect for that device after overrides.",
                "parameters": [query("device", "A device id.", json!({ "type": "string" }))],
                "responses": { "200": { "description": "rules" }, "404": error_response("Unknown device.") } } },
            "/api/v1/notify": { "get": { "summary": "Delivery state of every push channel (delivered, pending, failures, last error) and outbox counts.",
                "responses": { "200": { "description": "channels" } } } },
            "/api/v1/silences": {
                "get": { "summary": "Active silences and maintenance windows.", "responses": { "200": { "description": "silences" } } },
                "post": { "summary": "Add a silence: matchers site/device/kind/rule, start/end (RFC 3339) or recurring {month, day, weekday, nth, from, to, tz}, reason, actor.",
                    "responses": { "201": { "description": "The silence with its id." }, "400": error_response("Invalid silence.") } } },
            "/api/v1/silences/{id}": { "delete": { "summary": "Remove a silence.",
                "parameters": [json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } })],
                "responses": { "204": { "description": "Removed." }, "404": error_response("Unknown silence.") } } },
            "/api/v1/openapi.json": { "get": { "summary": "This document.", "responses": { "200": { "description": "OpenAPI 3.1" } } } },
            "/metrics": { "get": { "summary": "Prometheus text exposition.", "responses": { "200": { "description": "Metrics." } } } },
        },
        "components": {
            "schemas": { "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } } },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "A [[http.tokens]] token; roles viewer (reads), operator (writes), admin. Not required when no token is configured (loopback only)." } }
        },
        "security": [{ "bearer": [] }],
    })
}
