//! `GET|HEAD /v2/<name>/manifests/<tag|digest>`: the upstream's bytes, unchanged, with the
//! headers clients check (`Content-Type` = the manifest's own media type,
//! `Docker-Content-Digest`, `Content-Length`, `ETag`), identical on HEAD and GET.

use std::pin::Pin;
use std::task::{Context, Poll};

use actix_web::body::{BodySize, MessageBody};
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use bytes::Bytes;
use oci_spec::distribution::ErrorCode;
use pullcache_actors::{CacheOutcome, Kind, Reference};

use super::{AppState, Routed};
use crate::error::ApiError;
use crate::telemetry::access::AccessRecord;

pub async fn serve(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    routed: &Routed,
    reference: &str,
    head: bool,
) -> Result<HttpResponse, ApiError> {
    let reference = Reference::parse(reference)?;
    let answer = state
        .engine
        .manifests
        .resolve(routed.upstream, &routed.repo, reference.clone(), &routed.cx)
        .await?;
    let accept: Vec<&str> = req
        .headers()
        .get_all(header::ACCEPT)
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !accepts(&accept, &answer.media_type) {
        return Err(ApiError::oci(
            StatusCode::NOT_FOUND,
            ErrorCode::ManifestUnknown,
            format!(
                "manifest of type {} found, but the Accept header does not allow it",
                answer.media_type
            ),
        ));
    }
    let etag = format!("\"{}\"", answer.digest);
    let mut r = HttpResponse::Ok();
    r.insert_header((header::CONTENT_TYPE, answer.media_type.as_str()))
        .insert_header(("Docker-Content-Digest", answer.digest.to_string()))
        .insert_header((header::ETAG, etag.as_str()));
    if let Some(r) = AccessRecord::of(req) {
        r.answered(Kind::Manifest, answer.outcome);
    }
    if answer.outcome == CacheOutcome::Stale {
        r.insert_header((header::WARNING, "110 pullcache \"Response is Stale\""));
    }
    let not_modified = req
        .headers()
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == etag || t.trim() == "*");
    if not_modified {
        r.status(StatusCode::NOT_MODIFIED);
        return Ok(r.finish());
    }
    Ok(if head {
        head_response(&mut r, answer.bytes.len() as u64)
    } else {
        r.body(answer.bytes)
    })
}

/// Whether a response of `media_type` may answer a request with these `Accept` headers.
/// No `Accept` at all accepts anything; `*/*` and `type/*` match; `q=0` excludes.
pub fn accepts(headers: &[&str], media_type: &str) -> bool {
    if headers.iter().all(|h| h.trim().is_empty()) {
        return true;
    }
    let (mt_type, _) = media_type.split_once('/').unwrap_or((media_type, ""));
    headers.iter().flat_map(|h| h.split(',')).any(|item| {
        let mut parts = item.split(';');
        let range = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let zero_q = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .or_else(|| p.strip_prefix("Q="))
                .and_then(|q| q.trim().parse::<f32>().ok())
                == Some(0.0)
        });
        if zero_q || range.is_empty() {
            return false;
        }
        range == "*/*" || range == media_type || range.strip_suffix("/*") == Some(mt_type)
    })
}

/// A HEAD response: `Content-Length` is the size of the GET body, and there is no body.
///
/// The length is a header on a length-delimited stream with no bytes rather than a sized
/// body: actix-http encodes a response with the HEAD/GET flag of the newest request it has
/// parsed, so a HEAD answered while a pipelined GET is already parsed would otherwise be
/// framed as a GET with a body that never comes. This way it is right in both cases.
pub fn head_response(r: &mut HttpResponseBuilder, len: u64) -> HttpResponse {
    r.no_chunking(len).body(NoBytes)
}

/// An unsized body without bytes (see [`head_response`]).
pub struct NoBytes;

impl MessageBody for NoBytes {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";

    #[test]
    fn accept_negotiation() {
        assert!(accepts(&[], OCI_INDEX));
        assert!(accepts(
            &["application/vnd.docker.distribution.manifest.v2+json, */*"],
            OCI_INDEX
        ));
        // dockerd: one header per type
        assert!(accepts(&[DOCKER_V2, OCI_INDEX], OCI_INDEX));
        assert!(!accepts(&[DOCKER_V2], OCI_INDEX));
        assert!(accepts(&["application/*"], OCI_INDEX));
        assert!(!accepts(
            &["application/vnd.oci.image.index.v1+json;q=0"],
            OCI_INDEX
        ));
        assert!(accepts(
            &["application/vnd.oci.image.index.v1+json; q=0.5"],
            OCI_INDEX
        ));
        assert!(accepts(
            &[" application/vnd.oci.image.index.v1+json "],
            OCI_INDEX
        ));
    }
}
