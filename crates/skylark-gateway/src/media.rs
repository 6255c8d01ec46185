//! Attachments over HTTP: resumable uploads (tus 1.0, core and creation)
//! and downloads with byte ranges, authenticated by a media token
//! (`Authorization: Bearer …`, from `GetMediaToken` on the device's
//! connection). The service (`skylark_server::media`) decides; this module
//! speaks HTTP.
//!
//! | method | path | what |
//! | --- | --- | --- |
//! | OPTIONS | /v1/uploads | tus discovery: version, extensions, largest size |
//! | POST | /v1/uploads | start an upload of `Upload-Length` bytes; `Location` names it |
//! | HEAD | /v1/uploads/{id} | how far it got (`Upload-Offset`) |
//! | PATCH | /v1/uploads/{id} | append at `Upload-Offset` (`application/offset+octet-stream`) |
//! | GET | /v1/blobs/{id} | the stored bytes, whole or a `Range` (206) |
//!
//! These routes have neither the JSON API's body limit (an upload's size is
//! checked against `Upload-Length`, before anything is stored) nor its
//! request timeout (a large file takes longer); a body that stalls for
//! `STALL` ends the request, keeping what arrived.
//!
//! In a cluster they answer pages from other origins too (CORS): a page
//! sends and fetches files through the node its connection is on, which
//! need not be the one that served it (that one may be gone).

use crate::Shared;
use crate::http::ApiError;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use skylark_protocol::http;
use skylark_server::media::{Bearer, ByteRange, MediaError};
use std::time::Duration;

const TUS_VERSION: &str = "1.0.0";
/// An upload body that sends nothing for this long is cut off.
const STALL: Duration = Duration::from_secs(30);

pub(crate) fn routes(shared: Shared) -> Router<Shared> {
    Router::new()
        .route("/v1/uploads", post(create).options(options))
        .route("/v1/uploads/{id}", axum::routing::head(offset).patch(append))
        .route("/v1/blobs/{id}", get(download))
        .layer(axum::middleware::from_fn_with_state(shared, cors))
}

/// The cluster's nodes' advertised addresses (`host:port`), for the web
/// client's cross-origin requests; none on a single server. An address
/// with a character that has no place in one is left out.
pub(crate) fn node_addresses(shared: &Shared) -> Vec<String> {
    let Some(cluster) = shared.server.router.cluster() else { return Vec::new() };
    cluster
        .serving()
        .into_iter()
        .map(|(_, address)| address)
        .filter(|a| !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c)))
        .collect()
}

/// CORS in a cluster, for a page served by another node (that node may be
/// gone: the page's origin is then no member any more, so any origin is
/// let in). Nothing here rides on what a browser adds by itself — no
/// cookie, no address: every request needs a media token, which only a
/// device's own connection is given — so another site's page gains
/// nothing it could not do without a browser. The preflight is answered
/// here; every answer says which headers the page may read.
async fn cors(State(shared): State<Shared>, request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if shared.server.router.cluster().is_none() || !request.headers().contains_key(header::ORIGIN) {
        return next.run(request).await;
    }
    let preflight =
        request.method() == Method::OPTIONS && request.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers
            .insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, HEAD, POST, PATCH, OPTIONS"));
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, range, tus-resumable, upload-length, upload-offset"),
        );
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(
            "location, upload-offset, upload-length, tus-resumable, tus-max-size, retry-after, content-range",
        ),
    );
    response
}

fn media_error(e: MediaError) -> Response {
    let message = e.to_string();
    let (status, code) = match &e {
        MediaError::BadToken => {
            let mut response = ApiError::new(StatusCode::UNAUTHORIZED, "bad_token", message).into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return tus(response);
        }
        MediaError::DeviceRemoved => (StatusCode::UNAUTHORIZED, "device_removed"),
        MediaError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        MediaError::MissingLength => (StatusCode::BAD_REQUEST, "missing_length"),
        MediaError::QuotaExceeded { retry_after, .. } => {
            let err = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message).retry_after(*retry_after);
            return tus(err.into_response());
        }
        MediaError::RateLimited(limited) => {
            let err =
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message).retry_after(limited.retry_after);
            return tus(err.into_response());
        }
        MediaError::UnknownUpload => (StatusCode::NOT_FOUND, "unknown_upload"),
        MediaError::OffsetMismatch { .. } => (StatusCode::CONFLICT, "offset_mismatch"),
        MediaError::Busy => (StatusCode::CONFLICT, "upload_busy"),
        MediaError::PastLength { .. } => (StatusCode::BAD_REQUEST, "past_length"),
        MediaError::NotFound => (StatusCode::NOT_FOUND, "not_found"),
        MediaError::Forbidden => (StatusCode::FORBIDDEN, "forbidden"),
        MediaError::BadRange { size } => {
            let mut response = ApiError::new(StatusCode::RANGE_NOT_SATISFIABLE, "bad_range", message).into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return response;
        }
        MediaError::BadId(_) | MediaError::TooManyAttachments | MediaError::NotShareable(_) => {
            (StatusCode::BAD_REQUEST, "invalid_argument")
        }
        MediaError::Storage(_) | MediaError::Store(_) => {
            tracing::error!(error = %e, "attachment storage failed");
            let err = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the attachments' storage is unavailable; try again shortly",
            );
            return tus(err.into_response());
        }
    };
    tus(ApiError::new(status, code, message).into_response())
}

/// Every tus response names the protocol version.
fn tus(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// The bearer of the request's media token.
async fn bearer(shared: &Shared, headers: &HeaderMap) -> Result<Bearer, MediaError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or(MediaError::BadToken)?;
    shared.server.media.bearer(token).await
}

/// A tus request's bearer, or the answer refusing it: the wrong tus
/// version (412), or no valid media token (401).
async fn tus_bearer(shared: &Shared, headers: &HeaderMap) -> Result<Bearer, Box<Response>> {
    if let Some(refusal) = tus_refusal(headers) {
        return Err(Box::new(refusal));
    }
    bearer(shared, headers).await.map_err(|e| Box::new(media_error(e)))
}

/// tus requests name the version they speak: the refusal when they do not.
fn tus_refusal(headers: &HeaderMap) -> Option<Response> {
    if headers.get("tus-resumable").and_then(|v| v.to_str().ok()) == Some(TUS_VERSION) {
        return None;
    }
    let mut response = ApiError::new(
        StatusCode::PRECONDITION_FAILED,
        "tus_version",
        "send Tus-Resumable: 1.0.0 (the tus version this server speaks)",
    )
    .into_response();
    response.headers_mut().insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    Some(tus(response))
}

/// tus discovery: the version, the extensions, the largest upload.
#[utoipa::path(options, path = "/v1/uploads", tag = "attachments",
    responses((status = 204, description = "What this server's tus speaks", headers(
        ("Tus-Version" = String, description = "1.0.0"),
        ("Tus-Extension" = String, description = "creation"),
        ("Tus-Max-Size" = u64, description = "The largest upload, in bytes"),
    ))))]
pub(crate) async fn options(State(shared): State<Shared>) -> Response {
    let max = shared.server.media.config().max_upload_bytes;
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    headers.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    headers.insert("tus-extension", HeaderValue::from_static("creation"));
    if let Ok(v) = HeaderValue::from_str(&max.to_string()) {
        headers.insert("tus-max-size", v);
    }
    tus(response)
}

/// Starts an upload of `Upload-Length` bytes (tus creation).
#[utoipa::path(post, path = "/v1/uploads", tag = "attachments", security(("media_token" = [])),
    params(
        ("Tus-Resumable" = String, Header, description = "1.0.0"),
        ("Upload-Length" = u64, Header, description = "The upload's size in bytes"),
    ),
    responses(
        (status = 201, description = "Created", headers(
            ("Location" = String, description = "/v1/uploads/ID"),
            ("Upload-Offset" = u64, description = "0"),
        )),
        (status = 400, description = "`missing_length`", body = http::ApiError),
        (status = 401, description = "`bad_token`, `device_removed`", body = http::ApiError),
        (status = 412, description = "`tus_version`: Tus-Resumable is not 1.0.0", body = http::ApiError),
        (status = 413, description = "`too_large`", body = http::ApiError),
        (status = 429, description = "`quota_exceeded`, `rate_limited`", body = http::ApiError),
        (status = 503, description = "`unavailable`", body = http::ApiError),
    ))]
pub(crate) async fn create(State(shared): State<Shared>, headers: HeaderMap) -> Response {
    let who = match tus_bearer(&shared, &headers).await {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    let Some(length) = header_u64(&headers, "upload-length") else {
        return media_error(MediaError::MissingLength);
    };
    match shared.server.media.create(&who, length).await {
        Ok(id) => {
            let mut response = StatusCode::CREATED.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("/v1/uploads/{id}")) {
                response.headers_mut().insert(header::LOCATION, v);
            }
            response.headers_mut().insert("upload-offset", HeaderValue::from_static("0"));
            tus(response)
        }
        Err(e) => media_error(e),
    }
}

fn progress(status: StatusCode, offset: u64, length: Option<u64>) -> Response {
    let mut response = status.into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&offset.to_string()) {
        headers.insert("upload-offset", v);
    }
    if let Some(Ok(v)) = length.map(|l| HeaderValue::from_str(&l.to_string())) {
        headers.insert("upload-length", v);
    }
    tus(response)
}

/// How far an upload got (tus).
#[utoipa::path(head, path = "/v1/uploads/{id}", tag = "attachments", security(("media_token" = [])),
    params(
        ("id" = String, Path, description = "The upload's id"),
        ("Tus-Resumable" = String, Header, description = "1.0.0"),
    ),
    responses(
        (status = 200, description = "Its progress", headers(
            ("Upload-Offset" = u64, description = "The bytes the server holds durably"),
            ("Upload-Length" = u64, description = "The upload's size"),
        )),
        (status = 401, description = "`bad_token`, `device_removed`"),
        (status = 404, description = "`unknown_upload`"),
        (status = 412, description = "`tus_version`"),
        (status = 503, description = "`unavailable`"),
    ))]
pub(crate) async fn offset(State(shared): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let who = match tus_bearer(&shared, &headers).await {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    match shared.server.media.offset(&who, &id).await {
        Ok((offset, length)) => progress(StatusCode::OK, offset, Some(length)),
        // HEAD answers carry no body: the status says it.
        Err(e) => media_error(e),
    }
}

/// Appends to an upload at its current offset (tus).
#[utoipa::path(patch, path = "/v1/uploads/{id}", tag = "attachments", security(("media_token" = [])),
    params(
        ("id" = String, Path, description = "The upload's id"),
        ("Tus-Resumable" = String, Header, description = "1.0.0"),
        ("Upload-Offset" = u64, Header, description = "The upload's current offset"),
    ),
    request_body(content = String, content_type = "application/offset+octet-stream", description = "The next bytes"),
    responses(
        (status = 204, description = "Stored durably", headers(("Upload-Offset" = u64, description = "The new offset"))),
        (status = 400, description = "`past_length`, `missing_offset`", body = http::ApiError),
        (status = 401, description = "`bad_token`, `device_removed`", body = http::ApiError),
        (status = 404, description = "`unknown_upload`", body = http::ApiError),
        (status = 409, description = "`offset_mismatch`, `upload_busy`", body = http::ApiError),
        (status = 412, description = "`tus_version`", body = http::ApiError),
        (status = 415, description = "`content_type`", body = http::ApiError),
        (status = 503, description = "`unavailable`", body = http::ApiError),
    ))]
pub(crate) async fn append(
    State(shared): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let who = match tus_bearer(&shared, &headers).await {
        Ok(who) => who,
        Err(refusal) => return *refusal,
    };
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if content_type != Some("application/offset+octet-stream") {
        let err = ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content_type",
            "an upload's PATCH must have Content-Type: application/offset+octet-stream",
        );
        return tus(err.into_response());
    }
    let Some(offset) = header_u64(&headers, "upload-offset") else {
        let err = ApiError::new(StatusCode::BAD_REQUEST, "missing_offset", "Upload-Offset is missing or not a number");
        return tus(err.into_response());
    };
    // A body that stalls ends like one cut off: what arrived is kept.
    let stream = stall_limited(body.into_data_stream());
    match shared.server.media.append(&who, &id, offset, stream).await {
        Ok(offset) => progress(StatusCode::NO_CONTENT, offset, None),
        Err(e) => media_error(e),
    }
}

/// Ends `stream` with an error when no chunk arrives within `STALL`.
fn stall_limited(
    stream: axum::body::BodyDataStream,
) -> impl futures_util::Stream<Item = Result<axum::body::Bytes, String>> + Send {
    futures_util::stream::unfold(Some(stream), |state| async move {
        let mut stream = state?;
        match tokio::time::timeout(STALL, stream.next()).await {
            Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(stream))),
            Ok(Some(Err(e))) => Some((Err(e.to_string()), None)),
            Ok(None) => None,
            Err(_) => Some((Err("the upload stalled".to_owned()), None)),
        }
    })
}

/// A blob's bytes (ciphertext), whole or one `Range`.
#[utoipa::path(get, path = "/v1/blobs/{id}", tag = "attachments", security(("media_token" = [])),
    params(
        ("id" = String, Path, description = "The blob's id"),
        ("Range" = Option<String>, Header, description = "One range: bytes=A-B, bytes=A-, bytes=-N"),
    ),
    responses(
        (status = 200, description = "The whole blob", body = String, content_type = "application/octet-stream"),
        (status = 206, description = "The range", body = String, content_type = "application/octet-stream",
            headers(("Content-Range" = String, description = "bytes A-B/SIZE"))),
        (status = 401, description = "`bad_token`, `device_removed`", body = http::ApiError),
        (status = 403, description = "`forbidden`: not shared with you", body = http::ApiError),
        (status = 404, description = "`not_found`", body = http::ApiError),
        (status = 416, description = "`bad_range`", body = http::ApiError),
        (status = 503, description = "`unavailable`", body = http::ApiError),
    ))]
pub(crate) async fn download(
    State(shared): State<Shared>,
    method: Method,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let who = match bearer(&shared, &headers).await {
        Ok(who) => who,
        Err(e) => return media_error(e),
    };
    let range = headers.get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(ByteRange::parse);
    let download = match shared.server.media.download(&who, &id, range).await {
        Ok(download) => download,
        Err(e) => return media_error(e),
    };
    let partial = range.is_some();
    let length = download.end - download.start;
    let body = if method == Method::HEAD { Body::empty() } else { Body::from_stream(download.body) };
    let mut response = Response::new(body);
    *response.status_mut() = if partial { StatusCode::PARTIAL_CONTENT } else { StatusCode::OK };
    let headers = response.headers_mut();
    // Opaque bytes, never interpreted by a browser.
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_DISPOSITION, HeaderValue::from_static("attachment"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, no-store"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(v) = HeaderValue::from_str(&length.to_string()) {
        headers.insert(header::CONTENT_LENGTH, v);
    }
    if partial {
        let range = format!("bytes {}-{}/{}", download.start, download.end.saturating_sub(1), download.size);
        if let Ok(v) = HeaderValue::from_str(&range) {
            headers.insert(header::CONTENT_RANGE, v);
        }
    }
    response
}
