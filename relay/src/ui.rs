//! The web UI (placeholder; the UI is built in `relay/ui/` and embedded here).

use axum::Router;
use axum::response::Html;
use axum::routing::get;

/// Routes that serve the web UI. Merged into [`crate::app`].
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/", get(index))
}

async fn index() -> Html<&'static str> {
    Html(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>agentrun</title></head>\
         <body><h1>agentrun relay</h1><p>The web UI is not built into this relay yet. \
         The API is at <code>/api/runs</code>.</p></body></html>",
    )
}
