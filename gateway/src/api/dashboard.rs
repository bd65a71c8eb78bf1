//! The built-in operations dashboard (`dashboards/web/`), compiled into the binary so that
//! `citywatch` stays one file, and served at `/` and `/ui/…` without a token: the page itself
//! asks for one when the API answers 401. Not an API: every figure it shows comes from `/api/v1`.

use std::sync::OnceLock;

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};

use super::ApiError;

/// One file of the dashboard, as built into the binary.
#[derive(Debug)]
pub struct Asset {
    /// The file name under `dashboards/web/`, also its path under `/ui/`.
    pub name: &'static str,
    pub content_type: &'static str,
    pub body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:literal) => {
        Asset { name: $name, content_type: $type, body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/../dashboards/web/", $name)) }
    };
}

/// Every file of `dashboards/web/` (a test checks that none is missing).
pub const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("i18n.js", "text/javascript; charset=utf-8"),
    asset!("chart.js", "text/javascript; charset=utf-8"),
    asset!("format.js", "text/javascript; charset=utf-8"),
    asset!("ops.js", "text/javascript; charset=utf-8"),
    asset!("health.js", "text/javascript; charset=utf-8"),
    asset!("maintenance.js", "text/javascript; charset=utf-8"),
    asset!("map.js", "text/javascript; charset=utf-8"),
    asset!("favicon.svg", "image/svg+xml"),
];

/// Strong ETags of [`ASSETS`], same order, computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| ASSETS.iter().map(|a| format!("\"{}\"", hex::encode(&Sha256::digest(a.body)[..12]))).collect())
}

/// `/` (the page) and `/ui/{file}` (its scripts, styles and icon).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(|headers: HeaderMap| async move { serve("index.html", &headers) }))
        .route("/ui/{file}", get(|Path(file): Path<String>, headers: HeaderMap| async move { serve(&file, &headers) }))
}

fn serve(name: &str, headers: &HeaderMap) -> Response {
    let Some(index) = ASSETS.iter().position(|a| a.name == name) else {
        return ApiError::NotFound(format!("no dashboard file {name:?}")).into_response();
    };
    let asset = &ASSETS[index];
    let etag = &etags()[index];
    // Revalidate every time: the files are small, and a new binary must show its own page.
    let common = [(header::CACHE_CONTROL, HeaderValue::from_static("no-cache")), (header::ETAG, HeaderValue::from_str(etag).unwrap_or(HeaderValue::from_static("\"\"")))];
    let matches = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|tag| tag.trim() == etag));
    if matches {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    (common, [(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn get(path: &str, if_none_match: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
        let mut req = Request::get(path);
        if let Some(tag) = if_none_match {
            req = req.header(header::IF_NONE_MATCH, tag);
        }
        let res = routes::<()>().oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
        let status = res.status();
        let headers = res.headers().clone();
        let body = res.into_body().collect().await.expect("body").to_bytes().to_vec();
        (status, headers, body)
    }

    #[tokio::test]
    async fn the_page_is_served_at_the_root_as_html() {
        let (status, headers, body) = get("/", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert!(String::from_utf8_lossy(&body).contains("<script type=\"module\" src=\"/ui/app.js\">"));
    }

    #[tokio::test]
    async fn scripts_have_a_javascript_type_and_revalidate_by_etag() {
        let (status, headers, body) = get("/ui/app.js", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::CONTENT_TYPE], "text/javascript; charset=utf-8");
        assert!(!body.is_empty());
        let etag = headers[header::ETAG].to_str().expect("ascii etag").to_owned();
        let (status, _, body) = get("/ui/app.js", Some(&etag)).await;
        assert_eq!(status, StatusCode::NOT_MODIFIED);
        assert!(body.is_empty());
        let (status, _, _) = get("/ui/app.js", Some("\"stale\"")).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn an_unknown_file_is_a_json_404() {
        let (status, _, _) = get("/ui/../Cargo.toml", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, body) = get("/ui/nope.js", None).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert!(v["error"].as_str().is_some_and(|e| e.contains("nope.js")), "{v}");
    }

    /// A file added to dashboards/web/ but not to ASSETS would be missing from the binary.
    #[test]
    fn every_file_of_the_web_folder_is_built_in() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/web");
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("dashboards/web")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut built_in: Vec<String> = ASSETS.iter().map(|a| a.name.to_owned()).collect();
        built_in.sort();
        assert_eq!(on_disk, built_in);
    }

    /// Every `/ui/…` the page and its modules load is a built-in file.
    #[test]
    fn every_file_the_page_references_is_built_in() {
        for asset in ASSETS.iter().filter(|a| a.name.ends_with(".html") || a.name.ends_with(".js")) {
            let text = std::str::from_utf8(asset.body).expect("utf-8");
            let mut refs = Vec::new();
            for (i, _) in text.match_indices("/ui/") {
                let rest = &text[i + 4..];
                let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')).unwrap_or(rest.len());
                refs.push(&rest[..end]);
            }
            for (i, _) in text.match_indices("from './") {
                let rest = &text[i + 8..];
                refs.push(&rest[..rest.find('\'').unwrap_or(rest.len())]);
            }
            for r in refs {
                assert!(ASSETS.iter().any(|a| a.name == r), "{} references {r:?}, which is not built in", asset.name);
            }
        }
    }
}
