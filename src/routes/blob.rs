//! `GET|HEAD /v2/<name>/blobs/<digest>`: blob bytes from the store, or streamed from a
//! download in progress (started by this request or joined). `Range` gives 206; HEAD never
//! starts a download.

use actix_web::body::{BodyStream, SizedStream};
use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use pullcache_actors::reference::ReferenceError;
use pullcache_actors::{Digest, Kind};

use super::manifest::head_response;
use super::{AppState, Routed};
use crate::error::ApiError;
use crate::telemetry::access::AccessRecord;
use crate::zerocopy::{sendfile_body, SlotRef};

/// Bodies smaller than this are copied: one write with the head beats a second syscall.
const ZERO_COPY_MIN: u64 = 16 * 1024;

pub async fn serve(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    routed: &Routed,
    digest: &str,
    head: bool,
) -> Result<HttpResponse, ApiError> {
    let digest = Digest::parse(digest).map_err(ReferenceError::from)?;
    let mut r = HttpResponse::Ok();
    r.insert_header(("Docker-Content-Digest", digest.to_string()))
        .insert_header((header::ETAG, format!("\"{digest}\"")))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::CACHE_CONTROL, "max-age=31536000"))
        .content_type("application/octet-stream");
    if head {
        let size = state
            .engine
            .blobs
            .stat(routed.upstream, &routed.repo, &digest, &routed.cx)
            .await?;
        return Ok(head_response(&mut r, size));
    }
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(ByteRange::parse);
    let mut body = state
        .engine
        .blobs
        .open(routed.upstream, &routed.repo, &digest, &routed.cx)
        .await?;
    let record = AccessRecord::of(req);
    if let Some(r) = &record {
        r.answered(Kind::Blob, body.outcome());
    }
    let size = match (range, body.size()) {
        // The upstream sent no length: a range can only be placed once the download is
        // complete (dockerd and containerd need a 206 for a resume, never a 200).
        (Some(_), None) => Some(body.complete_size().await?),
        (_, size) => size,
    };
    let (status, start, end) = match (range, size) {
        (Some(range), Some(size)) => match range.resolve(size) {
            Some((start, end)) => {
                r.insert_header((
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{size}", end - 1),
                ));
                (StatusCode::PARTIAL_CONTENT, start, end)
            }
            None => {
                r.status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .insert_header((header::CONTENT_RANGE, format!("bytes */{size}")));
                return Ok(r.finish());
            }
        },
        (_, Some(size)) => (StatusCode::OK, 0, size),
        // Upstream sent no length: stream chunked.
        (_, None) => return Ok(r.body(BodyStream::new(body.stream(..)))),
    };
    r.status(status);
    let len = end - start;
    // Zero-copy when the connection can (plain TCP) and the body is worth two syscalls.
    let body = match req.conn_data::<SlotRef>() {
        Some(slot) if len >= ZERO_COPY_MIN && slot.available() => match body.regions(start..end) {
            Ok(regions) => {
                if let Some(rec) = &record {
                    rec.zero_copy(slot);
                }
                r.no_chunking(len);
                return Ok(r.body(BodyStream::new(sendfile_body(slot.clone(), regions))));
            }
            Err(body) => body,
        },
        _ => body,
    };
    Ok(r.body(SizedStream::new(len, body.stream(start..end))))
}

/// One `bytes=` range. Several ranges, other units or bad syntax: `None` (the whole blob is
/// sent with 200, which RFC 9110 allows and every client handles).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `a-b` (inclusive) or `a-` (`None`).
    From(u64, Option<u64>),
    /// `-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    pub fn parse(h: &str) -> Option<ByteRange> {
        let spec = h.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let (a, b) = (a.trim(), b.trim());
        if a.is_empty() {
            return Some(ByteRange::Suffix(b.parse().ok()?));
        }
        let start = a.parse().ok()?;
        if b.is_empty() {
            return Some(ByteRange::From(start, None));
        }
        let end: u64 = b.parse().ok()?;
        (end >= start).then_some(ByteRange::From(start, Some(end)))
    }

    /// The half-open byte interval for a blob of `size` bytes; `None` = unsatisfiable.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            ByteRange::From(start, end) if start < size => {
                Some((start, end.map_or(size, |e| e.min(size - 1) + 1)))
            }
            ByteRange::From(..) => None,
            ByteRange::Suffix(0) => None,
            ByteRange::Suffix(n) if size > 0 => Some((size.saturating_sub(n), size)),
            ByteRange::Suffix(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ByteRange::*;
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(ByteRange::parse("bytes=0-9"), Some(From(0, Some(9))));
        assert_eq!(ByteRange::parse("bytes=5-"), Some(From(5, None)));
        assert_eq!(ByteRange::parse("bytes=-3"), Some(Suffix(3)));
        assert_eq!(ByteRange::parse("bytes=0-1,4-5"), None);
        assert_eq!(ByteRange::parse("items=0-1"), None);
        assert_eq!(ByteRange::parse("bytes=9-3"), None);
        assert_eq!(From(0, Some(9)).resolve(100), Some((0, 10)));
        assert_eq!(From(90, Some(200)).resolve(100), Some((90, 100)));
        assert_eq!(From(100, None).resolve(100), None);
        assert_eq!(Suffix(10).resolve(4), Some((0, 4)));
        assert_eq!(Suffix(1).resolve(0), None);
        assert_eq!(From(0, None).resolve(0), None);
    }
}
