//! The requests the upstream actor makes of one upstream: a manifest (GET or HEAD), a
//! blob's size, a blob download pushed into a bounded channel, a page of tags. Each is
//! built on `Conn::send` (authentication, redirects, retries) in the parent module.

use awc::http::{header, Method, StatusCode};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use url::Url;

use super::{content_length, Conn, Req, MAX_MANIFEST_BYTES};
use crate::digest::Digest;
use crate::error::UpstreamError;
use crate::metrics::Kind;
use crate::oci::media_types;
use crate::trace::{kv, Context, Step};
use crate::upstream::{DownloadEvent, TagsPage, UpstreamManifest};

impl Conn {
    pub(in crate::upstream) async fn fetch_manifest(
        &self,
        repo: &str,
        reference: &str,
        head: bool,
        cx: &Context,
    ) -> Result<UpstreamManifest, UpstreamError> {
        let accept = media_types::ALL.join(", ");
        let method = if head { Method::HEAD } else { Method::GET };
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let mut resp = self
            .send_ok(Req::pull(method, url, repo, Some(&accept), cx))
            .await?;
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
            let b = self
                .body(&mut resp, MAX_MANIFEST_BYTES, "reading a manifest body")
                .await?;
            self.engine_metrics()
                .pulled(self.id(), Kind::Manifest, b.len() as u64);
            Some(b)
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
        cx: &Context,
    ) -> Result<u64, UpstreamError> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let mut resp = self
            .send(Req::pull(Method::HEAD, url.clone(), repo, None, cx))
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
                range: Some("bytes=0-0".into()),
                ..Req::pull(Method::GET, url, repo, None, cx)
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
        cx: &Context,
    ) {
        let step = Step::child(cx, "upstream.download", || {
            vec![
                kv("pullcache.upstream", self.settings.name.clone()),
                kv("oci.repository", repo.to_string()),
                kv("oci.digest", digest.to_string()),
            ]
        });
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let req = Req {
            blob: true,
            ..Req::pull(Method::GET, url, repo, None, step.cx())
        };
        let mut resp = match self.send(req).await {
            Ok(r) => r,
            Err(e) => {
                step.fail(&e);
                let _ = sink.send(DownloadEvent::Failed(e)).await;
                return;
            }
        };
        step.set(|| {
            vec![kv(
                "http.response.status_code",
                resp.status().as_u16() as i64,
            )]
        });
        if resp.status() != StatusCode::OK {
            let e = self.status_error(&mut resp, false).await;
            step.fail(&e);
            let _ = sink.send(DownloadEvent::Failed(e)).await;
            return;
        }
        let mut received = 0u64;
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
            end = match tokio::time::timeout(self.settings.idle_timeout, resp.next()).await {
                Ok(item) => self.batch(item, &mut pieces),
                Err(_) => Some(DownloadEvent::Failed(
                    self.timeout("while streaming a blob (idle)"),
                )),
            };
            while end.is_none() && pieces.iter().map(Bytes::len).sum::<usize>() < BATCH {
                match resp.next().now_or_never() {
                    None => break,
                    Some(item) => end = self.batch(item, &mut pieces),
                }
            }
            let n: usize = pieces.iter().map(Bytes::len).sum();
            received += n as u64;
            self.engine_metrics()
                .pulled(self.id(), Kind::Blob, n as u64);
            if !pieces.is_empty() && sink.send(DownloadEvent::Chunk(pieces)).await.is_err() {
                return;
            }
        }
        step.set(|| vec![kv("pullcache.bytes", received as i64)]);
        if let Some(e) = end {
            if let DownloadEvent::Failed(err) = &e {
                step.fail(err);
            }
            let _ = sink.send(e).await;
        }
    }

    pub(in crate::upstream) async fn fetch_tags(
        &self,
        repo: &str,
        n: Option<u32>,
        last: Option<&str>,
        cx: &Context,
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
            .send_ok(Req::pull(
                Method::GET,
                url,
                repo,
                Some("application/json"),
                cx,
            ))
            .await?;
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
        let body = self
            .body(&mut resp, MAX_MANIFEST_BYTES, "reading a tag list")
            .await?;
        let list: List = serde_json::from_slice(&body)
            .map_err(|e| self.protocol(format!("tag list is not JSON: {e}")))?;
        Ok(TagsPage {
            tags: list.tags.unwrap_or_default(),
            more,
        })
    }

    /// Adds a piece of a blob body to `pieces`; at the body's end, how it ended.
    fn batch(
        &self,
        item: Option<Result<Bytes, awc::error::PayloadError>>,
        pieces: &mut Vec<Bytes>,
    ) -> Option<DownloadEvent> {
        match item {
            Some(Ok(piece)) => {
                pieces.push(piece);
                None
            }
            Some(Err(e)) => Some(DownloadEvent::Failed(
                self.protocol(format!("blob body: {e}")),
            )),
            None => Some(DownloadEvent::End),
        }
    }
}
