//! `GET /v2/<name>/tags/list` (the upstream's list; the cached tags when it is down) and
//! `GET /v2/_catalog` (the repositories cached so far), both paginated with `n`/`last` and a
//! `Link` header that points back at pullcache, never at the upstream.

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};

use super::{AppState, Query, Routed};
use crate::auth::Caller;
use crate::error::{ApiError, Code};

pub async fn list(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    routed: &Routed,
    name: &str,
    q: &Query,
) -> Result<HttpResponse, ApiError> {
    let n = parse_n(q)?;
    let tags = state
        .engine
        .manifests
        .tags(routed.upstream, &routed.repo, &routed.cx)
        .await?;
    let (page, next) = paginate(tags, n, q.last.as_deref());
    let mut r = HttpResponse::Ok();
    if let (Some(last), Some(n)) = (next, n) {
        r.insert_header((
            header::LINK,
            link(req.uri().path(), &last, n, q.ns.as_deref()),
        ));
    }
    Ok(r.json(serde_json::json!({ "name": name, "tags": page })))
}

pub async fn catalog(
    req: &HttpRequest,
    state: &web::Data<AppState>,
    q: &Query,
    caller: &Caller,
) -> Result<HttpResponse, ApiError> {
    let n = Some(parse_n(q)?.unwrap_or(100));
    let mut names: Vec<String> = state
        .engine
        .repositories()
        .await?
        .into_iter()
        // Only what the caller may pull is listed.
        .filter(|(u, repo)| {
            state
                .auth
                .as_ref()
                .is_none_or(|a| a.allows(caller, state.router.name(*u), repo))
        })
        .map(|(u, repo)| state.router.client_name(u, &repo))
        .collect();
    names.sort();
    names.dedup();
    let (page, next) = paginate(names, n, q.last.as_deref());
    let mut r = HttpResponse::Ok();
    if let (Some(last), Some(n)) = (next, n) {
        r.insert_header((header::LINK, link(req.uri().path(), &last, n, None)));
    }
    Ok(r.json(serde_json::json!({ "repositories": page })))
}

fn parse_n(q: &Query) -> Result<Option<usize>, ApiError> {
    match &q.n {
        None => Ok(None),
        Some(s) => s.parse::<usize>().map(Some).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                Code::PaginationNumberInvalid,
                format!("n={s:?} is not a non-negative integer"),
            )
        }),
    }
}

/// Entries strictly after `last`, at most `n`; and the `last` of the next page if any.
fn paginate(
    mut all: Vec<String>,
    n: Option<usize>,
    last: Option<&str>,
) -> (Vec<String>, Option<String>) {
    if let Some(l) = last {
        all.retain(|t| t.as_str() > l);
    }
    match n {
        Some(n) if all.len() > n => {
            all.truncate(n);
            let next = (n > 0).then(|| all.last().cloned()).flatten();
            (all, next)
        }
        _ => (all, None),
    }
}

fn link(path: &str, last: &str, n: usize, ns: Option<&str>) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    q.append_pair("last", last).append_pair("n", &n.to_string());
    if let Some(ns) = ns {
        q.append_pair("ns", ns);
    }
    format!("<{path}?{}>; rel=\"next\"", q.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pagination() {
        let all: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        assert_eq!(
            paginate(all.clone(), Some(2), None),
            (vec!["a".into(), "b".into()], Some("b".into()))
        );
        assert_eq!(
            paginate(all.clone(), Some(2), Some("b")),
            (vec!["c".into(), "d".into()], None)
        );
        assert_eq!(paginate(all.clone(), Some(0), None), (vec![], None));
        assert_eq!(
            paginate(all.clone(), None, Some("c")),
            (vec!["d".into()], None)
        );
        assert_eq!(
            link("/v2/a/tags/list", "b", 2, Some("docker.io")),
            "</v2/a/tags/list?last=b&n=2&ns=docker.io>; rel=\"next\""
        );
    }
}
