//! Pod logs (`kubectl logs`, `-f`, `--previous`): read from the files the kubelet writes each
//! container's stdout and stderr to.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::apiserver::App;
use crate::apiserver::errors::ApiError;
use crate::apiserver::http::{Query, Target, key};

pub(super) async fn logs(
    app: &Arc<App>,
    target: &Target,
    name: &str,
    q: &Query,
) -> Result<Response, ApiError> {
    let pod = app
        .store
        .get(&key(&target.t), &target.ns, name)
        .ok_or_else(|| ApiError::not_found("", "pods", name))?;
    let container = match q.get("container") {
        Some(c) => c.clone(),
        None => {
            let cs = pod
                .pointer("/spec/containers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            if cs.len() != 1 {
                return Err(ApiError::bad_request(format!(
                    "a container name must be specified for pod {name}, choose one of: {:?}",
                    cs.iter()
                        .filter_map(|c| c["name"].as_str())
                        .collect::<Vec<_>>()
                )));
            }
            cs[0]["name"].as_str().unwrap_or_default().to_string()
        }
    };
    let uid = pod
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let path = app
        .pod_logs
        .as_ref()
        .map(|k| k.log_path(uid, &container))
        .ok_or_else(|| ApiError::bad_request("kube-sim runs without a kubelet"))?;
    let path = if q.get("previous").is_some_and(|p| p == "true") {
        let prev = path.with_extension("previous.log");
        if !prev.exists() {
            return Err(ApiError::bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{name}\" not found"
            )));
        }
        prev
    } else {
        path
    };
    let follow = q.get("follow").is_some_and(|f| f == "true");
    if !follow {
        let data = tokio::fs::read(&path).await.map_err(|_| {
            ApiError::bad_request(format!(
                "container \"{container}\" in pod \"{name}\" is waiting to start"
            ))
        })?;
        return Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], data).into_response());
    }
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let store = app.store.clone();
    let (ns, pod_name, k) = (target.ns.clone(), name.to_string(), key(&target.t));
    let uid = uid.to_string();
    tokio::spawn(async move {
        let mut offset = 0usize;
        loop {
            let data = tokio::fs::read(&path).await.unwrap_or_default();
            if data.len() > offset {
                if tx
                    .send(Ok(Bytes::copy_from_slice(&data[offset..])))
                    .await
                    .is_err()
                {
                    return;
                }
                offset = data.len();
            }
            let running = store.get(&k, &ns, &pod_name).is_some_and(|p| {
                p.pointer("/metadata/uid").and_then(Value::as_str) == Some(uid.as_str())
                    && !matches!(
                        p.pointer("/status/phase").and_then(Value::as_str),
                        Some("Succeeded") | Some("Failed")
                    )
            });
            if !running {
                let data = tokio::fs::read(&path).await.unwrap_or_default();
                if data.len() > offset {
                    let _ = tx.send(Ok(Bytes::copy_from_slice(&data[offset..]))).await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(ReceiverStream::new(rx)),
    )
        .into_response())
}
