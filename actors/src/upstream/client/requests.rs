//! The requests the upstream actor makes of one upstream: a manifest (GET or HEAD), a
//! blob's size, a blob download pushed into a bounded channel, a page of tags. Each is
//! built on `Conn::send` (authentication, redirects, retries) in the parent module.

use awc::http::{header, Method, StatusCode};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use url::Url;

use super::{content_length, pull_scope, Conn, Req, MAX_MANIFEST_BYTES};
use crate::digest::Digest;
use crate::error::UpstreamError;
use crate::oci::media_types;
use crate::upstream::{DownloadEvent, TagsPage, UpstreamManifest};

impl Conn {
    pub(in crate::upstream) async fn fetch_manifest(
        &self,
        repo: &str,
        reference: &str,
        head: bool,
    ) -> Result<UpstreamManifest, UpstreamError> {
        let accept = media_types::ALL.join(", ");
        let mut resp = self
            .send(Req {
                method: if head { Method::HEAD } else { Method::GET },
                url: self.url(&format!("/v2/{repo}/manifests/{reference}")),
                scope: Some(pull_scope(repo)),
                accept: Some(&accept),
                range: None,
                follow_redirects: true,
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(&mut resp, head).await);
        }
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        self.record_quota(&resp);
        let digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v.trim()).ok());
        if let Some(len) = content_length(&resp) {
            if len > MAX_MANIFEST_BYTES as u64 {
                return Err(
                    self.protocol(format!("manifest of {len} bytes exceeds the 4 MiB limit"))
                );
            }
        }
        let bytes = if head {
            None
        } else {
            let body = tokio::time::timeout(
                self.settings.response_timeout,
                resp.body().limit(MAX_MANIFEST_BYTES),
            )
            .await;
            match body {
                Err(_) => return Err(self.timeout("reading a manifest body")),
                Ok(Err(awc::error::PayloadError::Overflow)) => {
                    return Err(self.protocol("manifest exceeds the 4 MiB limit".into()))
                }
                Ok(Err(e)) => return Err(self.protocol(format!("reading a manifest body: {e}"))),
                Ok(Ok(b)) => Some(b),
            }
        };
        Ok(UpstreamManifest {
            media_type,
            digest,
            bytes,
        })
    }

    pub(in crate::upstream) async fn head_blob(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<u64, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let mut resp = self
            .send(Req {
                method: Method::HEAD,
                url: url.clone(),
                scope: Some(pull_scope(repo)),
                accept: None,
                range: None,
                follow_redirects: true,
            })
            .await?;
        if resp.status() == StatusCode::OK {
            if let Some(len) = content_length(&resp) {
                return Ok(len);
            }
        } else if resp.status() != StatusCode::METHOD_NOT_ALLOWED
            && resp.status() != StatusCode::FORBIDDEN
        {
            return Err(self.status_error(&mut resp, true).await);
        }
        // No usable length from HEAD (some redirect targets refuse HEAD or omit it): ask for
        // the first byte and read the total from Content-Range.
        let mut resp = self
            .send(Req {
                method: Method::GET,
                url,
                scope: Some(pull_scope(repo)),
                accept: None,
                range: Some("bytes=0-0".into()),
                follow_redirects: true,
            })
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit('/').next())
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| self.protocol("206 without a usable Content-Range".into())),
            StatusCode::OK => {
                content_length(&resp).ok_or_else(|| self.protocol("blob size unknown".into()))
            }
            _ => Err(self.status_error(&mut resp, false).await),
        }
    }

    pub(in crate::upstream) async fn download(
        &self,
        repo: &str,
        digest: &Digest,
        sink: mpsc::Sender<DownloadEvent>,
    ) {
        let req = Req {
            method: Method::GET,
            url: self.url(&format!("/v2/{repo}/blobs/{digest}")),
            scope: Some(pull_scope(repo)),
            accept: None,
            range: None,
            follow_redirects: true,
        };
        let mut resp = match self.send(req).await {
            Ok(r) => r,
            Err(e) => {
                let _ = sink.send(DownloadEvent::Failed(e)).await;
                return;
            }
        };
        if resp.status() != StatusCode::OK {
            let e = self.status_error(&mut resp, false).await;
            let _ = sink.send(DownloadEvent::Failed(e)).await;
            return;
        }
        if sink
            .send(DownloadEvent::Headers {
                total: content_length(&resp),
            })
            .await
            .is_err()
        {
            return;
        }
        // awc yields ~32 KiB pieces; whatever more is already buffered is sent along in one
        // event (up to BATCH), so the fill writer and its readers wake per batch, not per
        // piece. Nothing waits to fill a batch: the first byte is not delayed.
        const BATCH: usize = 1024 * 1024;
        let mut end: Option<DownloadEvent> = None;
        while end.is_none() {
            let mut pieces: Vec<Bytes> = Vec::new();
            let mut size = 0;
            match tokio::time::timeout(self.settings.idle_timeout, resp.next()).await {
                Ok(Some(Ok(chunk))) => {
                    size += chunk.len();
                    pieces.push(chunk);
                }
                Ok(Some(Err(e))) => {
                    end = Some(DownloadEvent::Failed(
                        self.protocol(format!("blob body: {e}")),
                    ))
                }
                Ok(None) => end = Some(DownloadEvent::End),
                Err(_) => {
                    end = Some(DownloadEvent::Failed(
                        self.timeout("while streaming a blob (idle)"),
                    ))
                }
            }
            while end.is_none() && size < BATCH {
                match resp.next().now_or_never() {
                    None => break,
                    Some(Some(Ok(more))) => {
                        size += more.len();
                        pieces.push(more);
                    }
                    Some(Some(Err(e))) => {
                        end = Some(DownloadEvent::Failed(
                            self.protocol(format!("blob body: {e}")),
                        ))
                    }
                    Some(None) => end = Some(DownloadEvent::End),
                }
            }
            if !pieces.is_empty() && sink.send(DownloadEvent::Chunk(pieces)).await.is_err() {
                return;
            }
        }
        if let Some(e) = end {
            let _ = sink.send(e).await;
        }
    }

    pub(in crate::upstream) async fn fetch_tags(
        &self,
        repo: &str,
        n: Option<u32>,
        last: Option<&str>,
    ) -> Result<TagsPage, UpstreamError> {
        let mut url = Url::parse(&self.url(&format!("/v2/{repo}/tags/list")))
            .map_err(|e| self.protocol(e.to_string()))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(n) = n {
                q.append_pair("n", &n.to_string());
            }
            if let Some(l) = last {
                q.append_pair("last", l);
            }
        }
        let mut url = url.to_string();
        if url.ends_with('?') {
            url.pop();
        }
        let mut resp = self
            .send(Req {
                method: Method::GET,
                url,
                scope: Some(pull_scope(repo)),
                accept: Some("application/json"),
                range: None,
                follow_redirects: true,
            })
            .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.status_error(&mut resp, false).await);
        }
        let more = resp
            .headers()
            .get_all(header::LINK)
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.contains("rel=\"next\"") || v.contains("rel=next"));
        #[derive(serde::Deserialize)]
        struct List {
            #[serde(default)]
            tags: Option<Vec<String>>,
        }
        let body = tokio::time::timeout(
            self.settings.response_timeout,
            resp.body().limit(MAX_MANIFEST_BYTES),
        )
        .await
        .map_err(|_| self.timeout("reading a tag list"))?
        .map_err(|e| self.protocol(format!("tag list: {e}")))?;
        let list: List = serde_json::from_slice(&body)
            .map_err(|e| self.protocol(format!("tag list is not JSON: {e}")))?;
        Ok(TagsPage {
            tags: list.tags.unwrap_or_default(),
            more,
        })
    }
}
