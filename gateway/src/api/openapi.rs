//! The OpenAPI 3.1 description of the API, served at `/api/v1/openapi.json`: every route, its
//! parameters (with the bounds the handlers check, so a fuzzer's valid input is accepted and
//! its invalid input refused), every status it can answer (401/403 from the token check,
//! 415/422 from the JSON body extractor) and the bearer scheme. Written by hand beside the
//! handlers; the API tests check every route listed here answers, and schemathesis
//! (tests/tests/api_contract.rs) checks the gateway against it.

use serde_json::{json, Map, Value};

use super::page::{DEFAULT_LIMIT, DEVICE_CURSOR, INCIDENT_CURSOR, MAX_LIMIT, QUARANTINE_CURSOR, WORK_ORDER_CURSOR};

/// Paths the document lists that a GET answers with 200 on the test fixture (the tests walk them).
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

fn error(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn ok(description: &str, schema: Value) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": schema } } })
}

fn query(name: &str, description: &str, schema: Value) -> Value {
    json!({ "name": name, "in": "query", "required": false, "description": description, "schema": schema })
}

fn schema(name: &str) -> Value {
    json!({ "$ref": format!("#/components/schemas/{name}") })
}

/// `limit` and `cursor` of a paginated list.
fn paging(default: usize, max: usize, cursor: &str) -> [Value; 2] {
    [
        query("limit", &format!("Items per page, 1–{max} (default {default})."), json!({ "type": "integer", "minimum": 1, "maximum": max })),
        query("cursor", "Opaque: the `next_cursor` of the previous page.", json!({ "type": "string", "pattern": cursor })),
    ]
}

/// The envelope of a paginated list: `count` in this page, `total` matching, `next_cursor`.
fn page_of(key: &str, item: Value, extra: Value) -> Value {
    let mut properties = Map::new();
    properties.insert("count".into(), json!({ "type": "integer", "minimum": 0, "description": "Items in this page." }));
    properties.insert("total".into(), json!({ "type": "integer", "minimum": 0, "description": "Items matching the filter, over all pages." }));
    properties.insert("limit".into(), json!({ "type": "integer", "minimum": 1 }));
    properties.insert("next_cursor".into(), json!({ "type": ["string", "null"], "description": "Pass as `cursor` for the next page; null on the last page." }));
    properties.insert(key.into(), json!({ "type": "array", "items": item }));
    if let Value::Object(extra) = extra {
        properties.extend(extra);
    }
    json!({ "type": "object", "required": ["count", "total", "limit", "next_cursor", key], "properties": properties })
}

/// Adds the statuses every operation can answer: 401 (no or a wrong token), and for writes
/// 403 (a token whose role is too low); the role each needs is in its description.
fn guarded(mut operation: Value, write: bool) -> Value {
    let responses = &mut operation["responses"];
    responses["401"] = error("No bearer token, or an unknown one (when tokens are configured).");
    if write {
        responses["403"] = error("The token's role is too low for this write.");
    }
    operation
}

fn get(operation: Value) -> Value {
    json!({ "get": guarded(operation, false) })
}

fn json_body(schema: Value) -> Value {
    json!({ "required": true, "content": { "application/json": { "schema": schema } } })
}

/// The statuses of an operation with a JSON body: 400 not JSON, 415 not `application/json`,
/// 422 JSON of the wrong shape.
fn body_errors(mut responses: Value) -> Value {
    responses["400"] = error("The body is not valid JSON, or a value is out of range.");
    responses["415"] = error("The body is not Content-Type: application/json.");
    responses["422"] = error("The body is JSON of the wrong shape (a missing or unknown field, a wrong type).");
    responses
}

pub fn document() -> Value {
    let device_id = json!({ "name": "id", "in": "path", "required": true, "description": "Device id, unique across the deployment.", "schema": { "type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$" } });
    let incident_id = json!({ "name": "id", "in": "path", "required": true, "description": "Incident id (inc-…).", "schema": { "type": "string", "pattern": "^[A-Za-z0-9_-]{1,128}$" } });
    let [dev_limit, dev_cursor] = paging(DEFAULT_LIMIT, MAX_LIMIT, DEVICE_CURSOR);
    let [inc_limit, inc_cursor] = paging(super::incidents::DEFAULT_INCIDENTS, super::incidents::MAX_INCIDENTS, INCIDENT_CURSOR);
    let [q_limit, q_cursor] = paging(DEFAULT_LIMIT, MAX_LIMIT, QUARANTINE_CURSOR);
    let [wo_limit, wo_cursor] = paging(DEFAULT_LIMIT, MAX_LIMIT, WORK_ORDER_CURSOR);
    let health_values = json!(["offline", "faulted", "stale", "low_battery", "stuck", "clock_skew", "online"]);
    let kinds = json!(["gas_detector", "smoke_detector", "siren_mount"]);
    let incident_states = "open, acknowledged, dispatched, resolved, cleared, closed, or active (the first three); comma-separated.";
    let state_pattern = "^(open|acknowledged|dispatched|resolved|cleared|closed|active)(,(open|acknowledged|dispatched|resolved|cleared|closed|active))*$";

    let mut paths = Map::new();
    paths.insert(
        "/api/v1/health".into(),
        get(json!({ "summary": "Gateway liveness, queue depths and store counters.", "operationId": "health",
            "responses": { "200": ok("Running.", json!({ "type": "object", "required": ["status"], "properties": { "status": { "type": "string" } } })) } })),
    );
    paths.insert(
        "/api/v1/devices".into(),
        get(json!({ "summary": "One page of devices in id order, with derived health; `total` and `by_health` count every matching device.", "operationId": "listDevices",
            "parameters": [
                query("site", "Only this site.", json!({ "type": "string" })),
                query("kind", "Only this kind.", json!({ "enum": kinds })),
                query("health", "Only devices with this health condition.", json!({ "enum": health_values })),
                dev_limit, dev_cursor,
            ],
            "responses": { "200": ok("A page of devices.", page_of("devices", schema("Device"), json!({ "by_health": { "type": "object", "additionalProperties": { "type": "integer" } } }))),
                           "400": error("A bad filter, limit or cursor.") } })),
    );
    paths.insert(
        "/api/v1/devices/{id}".into(),
        get(json!({ "summary": "One device.", "operationId": "getDevice", "parameters": [device_id.clone()],
            "responses": { "200": ok("The device.", schema("Device")), "400": error("A malformed id."), "404": error("Unknown device.") } })),
    );
    paths.insert(
        "/api/v1/devices/{id}/readings".into(),
        get(json!({ "summary": "Readings of one metric, raw or downsampled.", "operationId": "getReadings",
            "parameters": [ device_id.clone(),
                { "name": "metric", "in": "query", "required": true, "description": "A metric of the contract.",
                  "schema": { "enum": ["gas_lel", "valve_closed", "temp_c", "smoke_db_m", "co_ppm", "tilt_deg", "vibration_mg", "corrosion_um", "section_loss_pct", "battery_v", "rssi_dbm"] } },
                query("from", "Epoch milliseconds or RFC 3339; default: an hour before `to`. An empty range (from ≥ to) has no points.", json!({ "anyOf": [{ "type": "string", "pattern": "^[0-9]{1,14}$" }, { "type": "string", "format": "date-time" }] })),
                query("to", "Epoch milliseconds or RFC 3339; default: now.", json!({ "anyOf": [{ "type": "string", "pattern": "^[0-9]{1,14}$" }, { "type": "string", "format": "date-time" }] })),
                query("step", "Bucket size: milliseconds (≥ 1000) or a duration such as 30s, 5m, 1h, 1d; one point per bucket with min/max/avg/last/count. At most 10000 buckets: a longer range is answered from its last 10000 buckets (`from` in the answer says where it starts).",
                      json!({ "type": "string", "pattern": "^([1-9][0-9]{3,11}|[1-9][0-9]{0,5}(s|m|h|d))$" })),
                query("limit", "Most raw points, 1–10000 (default 10000).", json!({ "type": "integer", "minimum": 1, "maximum": super::MAX_POINTS })),
            ],
            "responses": { "200": ok("Points, oldest first.", json!({ "type": "object", "required": ["count", "points"], "properties": { "count": { "type": "integer" }, "points": { "type": "array" },
                               "long_term": { "type": "object", "description": "Cluster mode with `[storage.influx] history_url`: `samples` read from the long-term store for the range and `readings` of the answer taken from them (the partition owner's store has the rest), or `error` when it did not answer (the owner's points alone)." } } })),
                           "400": error("A missing metric, or bad parameters."), "404": error("Unknown device.") } })),
    );
    paths.insert(
        "/api/v1/devices/import".into(),
        json!({ "post": guarded(json!({ "summary": "Import the device inventory (CSV: id, site, kind, location, install_date, crew, phone, …); needs admin. Idempotent.", "operationId": "importDevices",
            "requestBody": { "required": true, "content": { "text/csv": { "schema": { "type": "string", "minLength": 1,
                "description": "The CSV file, header row first. Rows that do not parse are reported by line in the 200 answer, not refused as a whole." } } } },
            "responses": { "200": ok("What was imported and what was refused, by line.", json!({ "type": "object" })), "400": error("An empty body, or a header row that does not read (nothing imported)."),
                           "413": error("Larger than 64 MiB."), "415": error("A JSON or form body: the inventory is text/csv.") } }), true) }),
    );
    paths.insert(
        "/api/v1/devices/{id}/inspections".into(),
        json!({ "post": guarded(json!({ "summary": "Record a crew's completed inspection, calibration, cleaning or replacement; needs operator.", "operationId": "completeInspection",
            "parameters": [device_id],
            "requestBody": json_body(json!({ "type": "object", "additionalProperties": false, "required": ["result", "by"], "properties": {
                "result": { "enum": ["pass", "fail", "replaced"] }, "by": { "type": "string" }, "notes": { "type": "string", "maxLength": 2000 },
                "task": { "enum": ["inspection", "calibration", "cleaning", "replacement", "siren_season"] } } })),
            "responses": { "201": ok("The recorded completion.", json!({ "type": "object" })), "400": error("A bad body or task."), "404": error("Unknown device.") } }), true) }),
    );
    paths.insert(
        "/api/v1/inspections".into(),
        get(json!({ "summary": "The crews' work orders due within a horizon, soonest first; as JSON pages or one CSV file (`format=csv` or Accept: text/csv).", "operationId": "listWorkOrders",
            "parameters": [
                query("due_within_days", "Horizon, 0–3660 days (default 30).", json!({ "type": "integer", "minimum": 0, "maximum": crate::api::inspections::MAX_DAYS })),
                query("site", "Only this site.", json!({ "type": "string" })),
                query("overdue", "Only overdue work.", json!({ "type": "boolean" })),
                query("format", "json (default) or csv (all work orders, unpaginated).", json!({ "enum": ["json", "csv"] })),
                wo_limit, wo_cursor,
            ],
            "responses": { "200": { "description": "A page of work orders, or the CSV.", "content": {
                    "application/json": { "schema": page_of("items", json!({ "type": "object" }), json!({ "now": { "type": "string" }, "due_within_days": { "type": "integer" } })) },
                    "text/csv": { "schema": { "type": "string" } } } },
                "400": error("A bad parameter.") } })),
    );
    paths.insert(
        "/api/v1/quarantine".into(),
        get(json!({ "summary": "Rejected input, newest first, with its raw bytes; `counts` by reason.", "operationId": "listQuarantine",
            "parameters": [ q_limit, q_cursor,
                query("before", "Entries with an id below this (older paging; `cursor` is the same).", json!({ "type": "integer", "minimum": 0, "maximum": i64::MAX })) ],
            "responses": { "200": ok("A page of entries.", page_of("entries", json!({ "type": "object" }), json!({ "counts": { "type": "object", "additionalProperties": { "type": "integer" } } }))),
                           "400": error("A bad limit or cursor.") } })),
    );
    paths.insert(
        "/api/v1/incidents".into(),
        get(json!({ "summary": "Incidents, most recently updated first, with counts by state.", "operationId": "listIncidents",
            "parameters": [
                query("state", incident_states, json!({ "type": "string", "pattern": state_pattern })),
                query("rule", "Only this rule.", json!({ "type": "string" })),
                query("site", "Only this site.", json!({ "type": "string" })),
                query("device", "Only this device.", json!({ "type": "string" })),
                query("parent", "Only the children of this incident (its `children`).", json!({ "type": "string" })),
                query("scope", "Cluster mode: `city` (default) lists every gateway's incidents from the replicated log, `local` this gateway's own book. The same in single-node mode.", json!({ "type": "string", "enum": ["city", "local"] })),
                inc_limit, inc_cursor,
            ],
            "responses": { "200": ok("A page of incidents.", page_of("incidents", schema("Incident"), json!({ "by_state": { "type": "object", "additionalProperties": { "type": "integer" } } }))),
                           "400": error("A bad filter, limit or cursor.") } })),
    );
    paths.insert(
        "/api/v1/incidents/{id}".into(),
        get(json!({ "summary": "One incident with its full history.", "operationId": "getIncident", "parameters": [incident_id.clone()],
            "responses": { "200": ok("The incident.", schema("Incident")), "404": error("Unknown incident.") } })),
    );
    for (action, summary, crew) in [
        ("ack", "Acknowledge: open → acknowledged.", false),
        ("dispatch", "Dispatch to a crew: open or acknowledged → dispatched.", true),
        ("resolve", "Resolve: the crew's work is done.", false),
        ("close", "Close after review: resolved or cleared → closed.", false),
    ] {
        let mut properties = json!({
            "actor": { "type": ["string", "null"], "description": "Who acts; with tokens the token's name is recorded (and a different actor as `actor via token`). Required when no token is configured." },
            "note": { "type": ["string", "null"] },
        });
        let mut required = Vec::<&str>::new();
        if crew {
            properties["crew"] = json!({ "type": "string", "minLength": 1, "pattern": "\\S", "description": "The crew dispatched." });
            required.push("crew");
        }
        let mut responses = body_errors(json!({
            "200": ok("The incident after the transition, committed and queued for every push channel.", schema("Incident")),
            "404": error("Unknown incident."),
            "409": error("Not allowed from the incident's state."),
        }));
        if !crew {
            // Without a body (no Content-Type) the token's name is the actor.
            responses["400"] = error("The body is not valid JSON.");
        }
        let operation = json!({ "summary": format!("{summary} Needs operator."), "operationId": format!("{action}Incident"),
            "parameters": [incident_id.clone()],
            "requestBody": { "required": crew, "content": { "application/json": { "schema": { "type": "object", "additionalProperties": false, "required": required, "properties": properties } } } },
            "responses": responses });
        paths.insert(format!("/api/v1/incidents/{{id}}/{action}"), json!({ "post": guarded(operation, true) }));
    }
    paths.insert(
        "/api/v1/events".into(),
        get(json!({ "summary": "Server-Sent Events: every incident change as `event: incident` with `id:` its outbox position; send Last-Event-ID to catch up after a reconnect. Browsers may pass the token as `?access_token=`.", "operationId": "events",
            "responses": { "200": { "description": "An endless text/event-stream.", "content": { "text/event-stream": { "schema": { "type": "string" } } } } } })),
    );
    paths.insert(
        "/api/v1/rules".into(),
        get(json!({ "summary": "The rule pack, or with ?device= the rules in effect for that device after overrides.", "operationId": "rules",
            "parameters": [query("device", "A device id.", json!({ "type": "string" }))],
            "responses": { "200": ok("The rules.", json!({ "type": "object", "required": ["rules"] })), "400": error("An unknown parameter."), "404": error("Unknown device.") } })),
    );
    paths.insert(
        "/api/v1/notify".into(),
        get(json!({ "summary": "Delivery state of every push channel (delivered, pending, failures, last error) and outbox counts.", "operationId": "notify",
            "responses": { "200": ok("The channels.", json!({ "type": "object", "required": ["channels"] })) } })),
    );
    let silence = json!({ "type": "object", "additionalProperties": false, "properties": {
        "site": { "type": "string" }, "device": { "type": "string" }, "kind": { "enum": kinds }, "rule": { "type": "string", "minLength": 1 },
        "start": { "type": "string", "format": "date-time" }, "end": { "type": "string", "format": "date-time" },
        "recurring": { "type": "object", "additionalProperties": false, "required": ["from", "to"], "description": "A yearly or monthly window: month, day or weekday+nth, from–to (HH:MM), tz (IANA).",
            "properties": { "month": { "type": "integer", "minimum": 1, "maximum": 12 }, "day": { "type": "integer", "minimum": 1, "maximum": 31 }, "weekday": { "type": "string" }, "nth": { "type": "integer", "minimum": 1, "maximum": 5 },
                            "from": { "type": "string" }, "to": { "type": "string" }, "tz": { "type": "string" } } },
        "reason": { "type": "string" }, "actor": { "type": "string" } } });
    paths.insert(
        "/api/v1/silences".into(),
        json!({
            "get": guarded(json!({ "summary": "Active silences and maintenance windows.", "operationId": "listSilences",
                "responses": { "200": ok("The silences.", json!({ "type": "object", "required": ["silences"] })) } }), false),
            "post": guarded(json!({ "summary": "Add a silence: matchers site/device/kind/rule, start/end (RFC 3339) or recurring, reason, actor. Needs operator.", "operationId": "addSilence",
                "requestBody": json_body(silence),
                "responses": body_errors(json!({ "201": ok("The silence with its id.", json!({ "type": "object", "required": ["id"] })) })) }), true),
        }),
    );
    paths.insert(
        "/api/v1/silences/{id}".into(),
        json!({ "delete": guarded(json!({ "summary": "Remove a silence. Needs operator.", "operationId": "removeSilence",
            "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" } }],
            "responses": { "204": { "description": "Removed." }, "404": error("Unknown silence.") } }), true) }),
    );
    paths.insert(
        "/api/v1/openapi.json".into(),
        get(json!({ "summary": "This document.", "operationId": "openapi", "responses": { "200": ok("OpenAPI 3.1.", json!({ "type": "object" })) } })),
    );
    paths.insert(
        "/metrics".into(),
        get(json!({ "summary": "Prometheus exposition in the OpenMetrics text format.", "operationId": "metrics",
            "responses": { "200": { "description": "Metrics.", "content": { "application/openmetrics-text": { "schema": { "type": "string" } } } } } })),
    );

    json!({
        "openapi": "3.1.0",
        "info": { "title": "Citywatch gateway API", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Devices, sensor health, readings, quarantine, incidents and their closed loop, inspections, rules and push channels of the Citywatch gateway. Every error is JSON {\"error\": \"…\"}. Lists are paginated: `limit`, an opaque `cursor`, and `count`, `total` and `next_cursor` in the answer." },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": { "type": "object", "required": ["error"], "properties": { "error": { "type": "string" } } },
                "Device": { "type": "object", "required": ["id", "site", "kind", "health", "health_flags"], "properties": {
                    "id": { "type": "string" }, "site": { "type": "string" }, "kind": { "enum": kinds },
                    "health": { "enum": health_values }, "health_flags": { "type": "array", "items": { "enum": health_values } },
                    "last_seen": { "type": "string" }, "values": { "type": "object" } } },
                "Incident": { "type": "object", "required": ["id", "key", "revision", "rule", "severity", "state"], "properties": {
                    "id": { "type": "string" }, "key": { "type": "string" }, "revision": { "type": "integer" }, "rule": { "type": "string" },
                    "severity": { "type": "string" }, "state": { "enum": ["open", "acknowledged", "dispatched", "resolved", "cleared", "closed"] },
                    "scope": { "enum": ["device", "site"] }, "site": { "type": "string" }, "device": { "type": "string", "description": "The device; for a site incident the latest one." },
                    "devices": { "type": "array", "items": { "type": "string" }, "description": "Site incidents: the devices counted (composite rules) or, for a group (outage storm), the devices for which the rule holds now." },
                    "situation": { "type": "string", "description": "The rule pack's `[[situation]]` (device scope) or `[[group]]` (site scope) this incident is." },
                    "rules_active": { "type": "array", "items": { "type": "string" }, "description": "Member rules active now." },
                    "parent": { "type": "string", "description": "The incident this one is part of (rule pack `[[parent]]`, or the site outage it was folded into by a `[[group]]`). Absent: none." },
                    "children": { "type": "array", "items": { "type": "string" }, "description": "Ids of the incidents whose `parent` this one is, in the order they joined. Absent: none." },
                    "history": { "type": "array" } } },
            },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "A [[http.tokens]] token; roles viewer (reads), operator (writes), admin (device import). Not required when no token is configured (loopback only)." } }
        },
        "security": [{ "bearer": [] }],
    })
}
