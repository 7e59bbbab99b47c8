//! The web UI: static assets from `relay/ui/`, embedded in the binary.
//!
//! `/` (run list) and `/runs/{run}` (run page) serve the same `index.html`; the page's modules
//! and stylesheet are under `/ui/`. Every response carries a strict Content-Security-Policy
//! (no inline script or style, nothing from other origins, no plugins, no framing), so even a
//! bug in the page's rendering of untrusted agent output could not run script. The assets
//! themselves build all agent-controlled content with `textContent` (see `docs/ui.md`).

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The Content-Security-Policy of every UI response.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

impl Asset {
    const fn new(name: &'static str, content_type: &'static str, body: &'static [u8]) -> Self {
        Self {
            name,
            content_type,
            body,
        }
    }
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const SVG: &str = "image/svg+xml";

const INDEX: Asset = Asset::new("index.html", HTML, include_bytes!("../ui/index.html"));

/// The files under `/ui/`, one a line.
const ASSETS: &[Asset] = &[
    Asset::new("app.js", JS, include_bytes!("../ui/app.js")),
    Asset::new("ansi.js", JS, include_bytes!("../ui/ansi.js")),
    Asset::new("terminal.js", JS, include_bytes!("../ui/terminal.js")),
    Asset::new("lines.js", JS, include_bytes!("../ui/lines.js")),
    Asset::new("markdown.js", JS, include_bytes!("../ui/markdown.js")),
    Asset::new("style.css", CSS, include_bytes!("../ui/style.css")),
    Asset::new("favicon.svg", SVG, include_bytes!("../ui/favicon.svg")),
];

/// Routes that serve the web UI. Merged into [`crate::app`].
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/runs/{run}", get(index))
        .route("/favicon.ico", get(favicon))
        .route("/ui/{file}", get(asset))
}

async fn index(headers: HeaderMap) -> Response {
    serve(&INDEX, &headers)
}

async fn favicon(headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == "favicon.svg") {
        Some(a) => serve(a, &headers),
        None => not_found(),
    }
}

async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => serve(a, &headers),
        None => not_found(),
    }
}

/// A strong validator for an asset: FNV-1a of its bytes (assets change only with the binary).
fn etag(body: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in body {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("\"{h:016x}\"")
}

fn security_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Revalidate every time: cheap (ETag) and never stale after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
}

fn serve(asset: &Asset, request: &HeaderMap) -> Response {
    let tag = etag(asset.body);
    let fresh = request
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut response = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let headers = response.headers_mut();
    security_headers(headers);
    if let Ok(v) = HeaderValue::from_str(&tag) {
        headers.insert(header::ETAG, v);
    }
    response
}

fn not_found() -> Response {
    let mut response = (
        StatusCode::NOT_FOUND,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        "no such UI asset\n",
    )
        .into_response();
    security_headers(response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_loads_is_embedded() {
        let index = std::str::from_utf8(INDEX.body).unwrap();
        for needed in ["/ui/app.js", "/ui/style.css", "/ui/favicon.svg"] {
            assert!(
                index.contains(needed),
                "index.html no longer loads {needed}"
            );
        }
        for a in ASSETS {
            assert!(!a.body.is_empty(), "{} is empty", a.name);
        }
        // Modules imported by app.js must be served too.
        let app = std::str::from_utf8(ASSETS[0].body).unwrap();
        for line in app.lines().filter(|l| l.starts_with("import ")) {
            let file = line
                .rsplit("'./")
                .next()
                .and_then(|s| s.split('\'').next())
                .unwrap();
            assert!(
                ASSETS.iter().any(|a| a.name == file),
                "app.js imports {file}, which is not embedded"
            );
        }
    }

    #[test]
    fn etags_differ_by_content() {
        assert_ne!(etag(b"a"), etag(b"b"));
        assert_eq!(etag(b"a"), etag(b"a"));
    }
}
