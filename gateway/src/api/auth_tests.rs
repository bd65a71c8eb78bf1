use super::*;

fn token(name: &str, role: Role, secret: &str) -> TokenConfig {
    TokenConfig { name: name.into(), role, token: Some(secret.into()), token_sha256: None }
}

#[test]
fn policy_by_method_and_path() {
    use Method as M;
    assert_eq!(required_role(&M::GET, "/"), None, "the dashboard is public");
    assert_eq!(required_role(&M::GET, "/assets/app.js"), None);
    assert_eq!(required_role(&M::GET, "/apiary"), None, "only /api/ itself is guarded");
    assert_eq!(required_role(&M::GET, "/api/v1/devices"), Some(Role::Viewer));
    assert_eq!(required_role(&M::GET, "/metrics"), Some(Role::Viewer));
    assert_eq!(required_role(&M::GET, "/api/v1/nowhere"), Some(Role::Viewer), "unknown API paths are guarded too");
    assert_eq!(required_role(&M::POST, "/api/v1/incidents/inc-1/ack"), Some(Role::Operator));
    assert_eq!(required_role(&M::DELETE, "/api/v1/silences/s-1"), Some(Role::Operator));
    assert_eq!(required_role(&M::POST, "/api/v1/devices/gas-1/inspections"), Some(Role::Operator));
    assert_eq!(required_role(&M::POST, "/api/v1/devices/import"), Some(Role::Admin));
    assert_eq!(required_role(&M::PUT, "/api/v1/rules"), Some(Role::Admin));
    assert_eq!(required_role(&M::GET, "/api/v1/rules"), Some(Role::Viewer));
    assert_eq!(required_role(&M::POST, "/api/v1/admin/anything"), Some(Role::Admin));
    assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
}

#[test]
fn tokens_are_kept_hashed_and_matched() {
    let hashed = TokenConfig {
        name: "desk".into(),
        role: Role::Operator,
        token: None,
        token_sha256: Some(hex::encode(Sha256::digest(b"desk-secret-0123456789"))),
    };
    let auth = Authenticator::new(&[token("wall", Role::Viewer, "wall-secret-0123456789"), hashed]);
    assert!(!auth.is_open());
    assert_eq!(auth.identify("wall-secret-0123456789"), Some(Caller { name: "wall".into(), role: Role::Viewer }));
    assert_eq!(auth.identify("desk-secret-0123456789").map(|c| c.role), Some(Role::Operator));
    assert_eq!(auth.identify("desk-secret-012345678"), None);
    assert_eq!(auth.identify(""), None);
    let debug = format!("{auth:?} {:?}", token("wall", Role::Viewer, "wall-secret-0123456789"));
    assert!(!debug.contains("wall-secret"), "secrets never reach logs: {debug}");
    assert!(Authenticator::new(&[]).is_open());
}

#[test]
fn config_checks_name_the_key() {
    let err = validate(&[token("a", Role::Viewer, "short")]).expect_err("short");
    assert_eq!(err.0, "http.tokens[0].token");
    let bad_hash = TokenConfig { name: "b".into(), role: Role::Admin, token: None, token_sha256: Some("abc".into()) };
    let err = validate(&[token("a", Role::Viewer, "a-long-enough-secret"), bad_hash]).expect_err("bad hash");
    assert_eq!(err.0, "http.tokens[1].token_sha256");
    let err = validate(&[token("a", Role::Viewer, "a-long-enough-secret"), token("a", Role::Admin, "another-long-secret")]).expect_err("dup name");
    assert_eq!(err.0, "http.tokens[1].name");
    let neither = TokenConfig { name: "c".into(), role: Role::Admin, token: None, token_sha256: None };
    assert_eq!(validate(&[neither]).expect_err("none").0, "http.tokens[0].token");
    assert!(validate(&[token("a", Role::Viewer, "a-long-enough-secret")]).is_ok());

    let open = check_exposure("0.0.0.0:8080".parse().expect("addr"), &[]).expect_err("open API on the network");
    assert_eq!(open.0, "http.listen");
    assert!(check_exposure("127.0.0.1:8080".parse().expect("addr"), &[]).is_ok());
    assert!(check_exposure("[::1]:8080".parse().expect("addr"), &[]).is_ok());
    assert!(check_exposure("0.0.0.0:8080".parse().expect("addr"), &[token("a", Role::Viewer, "a-long-enough-secret")]).is_ok());
}

#[test]
fn the_full_config_refuses_an_open_api_on_the_network() {
    let err = crate::config::Config::from_toml("[http]\nlisten = \"0.0.0.0:8080\"\n").expect_err("open");
    assert!(err.to_string().starts_with("http.listen"), "{err}");
    let ok = crate::config::Config::from_toml(
        "[http]\nlisten = \"0.0.0.0:8080\"\n[[http.tokens]]\nname = \"desk\"\nrole = \"operator\"\ntoken_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n",
    );
    assert!(ok.is_ok(), "{ok:?}");
    let err = crate::config::Config::from_toml("[[http.tokens]]\nname = \"desk\"\nrole = \"boss\"\ntoken = \"0123456789abcdef\"\n").expect_err("role");
    assert!(err.to_string().contains("boss"), "{err}");
}

#[test]
fn created_tokens_are_fresh_and_their_snippet_parses() {
    let (a, b) = (new_token(), new_token());
    assert_ne!(a, b);
    assert!(a.len() >= 64, "{a}");
    let snippet = token_snippet("duty desk", Role::Operator, &a);
    assert!(snippet.contains(&a));
    let toml_part = &snippet[snippet.find("[[http.tokens]]").expect("snippet")..];
    assert!(!toml_part.contains(&a), "the config part holds only the hash");
    let config = crate::config::Config::from_toml(&format!("[http]\nlisten = \"0.0.0.0:1\"\n{toml_part}")).expect("snippet is valid config");
    let auth = Authenticator::new(&config.http.tokens);
    assert_eq!(auth.identify(&a), Some(Caller { name: "duty desk".into(), role: Role::Operator }));
}

mod http {
    use super::*;
    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use axum::routing::{get, post};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app() -> axum::Router {
        let router = axum::Router::new()
            .route("/", get(|| async { "dashboard" }))
            .route("/metrics", get(|| async { "metrics" }))
            .route("/api/v1/devices", get(|| async { "devices" }))
            .route("/api/v1/events", get(|| async { "events" }))
            .route(
                "/api/v1/incidents/{id}/{action}",
                post(|caller: Option<axum::Extension<Caller>>| async move { caller.map(|c| c.0.name).unwrap_or_default() }),
            )
            .route("/api/v1/devices/import", post(|| async { "imported" }));
        let tokens = [
            token("wall", Role::Viewer, "viewer-token-0123456789"),
            token("desk", Role::Operator, "operator-token-0123456789"),
            token("root", Role::Admin, "admin-token-0123456789"),
        ];
        protect(router, Arc::new(Authenticator::new(&tokens)))
    }

    async fn call(method: &str, uri: &str, bearer: Option<&str>) -> (StatusCode, Option<String>, String) {
        let mut request = HttpRequest::builder().method(method).uri(uri);
        if let Some(t) = bearer {
            request = request.header("authorization", format!("Bearer {t}"));
        }
        let response = app().oneshot(request.body(Body::empty()).expect("request")).await.expect("response");
        let status = response.status();
        let challenge = response.headers().get("www-authenticate").map(|v| v.to_str().expect("ascii").to_owned());
        let body = response.into_body().collect().await.expect("body").to_bytes();
        (status, challenge, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn missing_or_wrong_token_is_401_with_a_challenge() {
        let (status, challenge, body) = call("GET", "/api/v1/devices", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(challenge.as_deref(), Some("Bearer realm=\"citywatch\""));
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
        assert!(json["error"].as_str().expect("message").contains("bearer"), "{body}");
        let (status, challenge, _) = call("GET", "/metrics", Some("guess-0123456789")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(challenge.expect("challenge").contains("invalid_token"));
        let (status, _, _) = call("POST", "/api/v1/incidents/i/ack", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn roles_gate_reads_writes_and_admin_things() {
        assert_eq!(call("GET", "/api/v1/devices", Some("viewer-token-0123456789")).await.0, StatusCode::OK);
        assert_eq!(call("GET", "/metrics", Some("viewer-token-0123456789")).await.0, StatusCode::OK);
        let (status, _, body) = call("POST", "/api/v1/incidents/i/ack", Some("viewer-token-0123456789")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let json: serde_json::Value = serde_json::from_str(&body).expect("JSON error");
        assert!(json["error"].as_str().expect("message").contains("needs operator"), "{body}");
        let (status, _, body) = call("POST", "/api/v1/incidents/i/ack", Some("operator-token-0123456789")).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "desk"), "the handler sees who called");
        assert_eq!(call("POST", "/api/v1/devices/import", Some("operator-token-0123456789")).await.0, StatusCode::FORBIDDEN);
        assert_eq!(call("POST", "/api/v1/devices/import", Some("admin-token-0123456789")).await.0, StatusCode::OK);
        assert_eq!(call("POST", "/api/v1/incidents/i/ack", Some("admin-token-0123456789")).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn dashboard_is_public_and_the_stream_takes_a_query_token() {
        assert_eq!(call("GET", "/", None).await.0, StatusCode::OK);
        assert_eq!(call("GET", "/api/v1/events", None).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call("GET", "/api/v1/events?access_token=viewer-token-0123456789", None).await.0, StatusCode::OK);
        // Only the stream: other routes do not read tokens from URLs (they end up in logs).
        assert_eq!(call("GET", "/api/v1/devices?access_token=viewer-token-0123456789", None).await.0, StatusCode::UNAUTHORIZED);
        // Not a bearer scheme.
        let response = app()
            .oneshot(HttpRequest::get("/api/v1/devices").header("authorization", "Basic dmlld2VyOng=").body(Body::empty()).expect("request"))
            .await
            .expect("response");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
}
