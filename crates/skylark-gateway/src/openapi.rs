//! The public HTTP API (sign-up, linking, push key, nodes, health,
//! attachments) as an OpenAPI 3 document, generated from the handlers'
//! annotations and the body types of `skylark_protocol::http`; served at
//! `/v1/openapi.json`.
//! The WebSocket protocol is docs/PROTOCOL.md's; the admin API is on the
//! admin listener and not part of this document.

use skylark_protocol::http;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Skylark HTTP API",
        description = "Sign-up by SMS code, linking new devices, the Web Push key, a cluster's nodes, \
                       attachments' uploads (tus 1.0) and downloads. \
                       Every error is JSON {\"error\", \"message\"}; rate limits add Retry-After.",
    ),
    paths(
        crate::http::start,
        crate::http::status,
        crate::http::resend,
        crate::http::verify,
        crate::http::create_link,
        crate::http::wait_link,
        crate::http::vapid_key,
        crate::http::nodes,
        crate::http::healthz,
        crate::http::readyz,
        crate::media::options,
        crate::media::create,
        crate::media::offset,
        crate::media::append,
        crate::media::download,
    ),
    modifiers(&MediaToken),
    components(schemas(
        http::StartVerification,
        http::SmsStatus,
        http::VerificationView,
        http::VerifyRequest,
        http::Registered,
        http::LinkRequest,
        http::Link,
        http::LinkStatus,
        http::VapidKey,
        http::NodeList,
        http::NodeAddress,
        http::ApiError,
    ))
)]
struct Api;

/// The attachments' endpoints take a media token (`GetMediaToken` over the
/// device's connection) as a bearer token.
struct MediaToken;

impl utoipa::Modify for MediaToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .description(Some("A media token from GetMediaToken on the device's connection (docs/PROTOCOL.md)"))
            .build();
        components.add_security_scheme("media_token", SecurityScheme::Http(bearer));
    }
}

/// The document, with this build's version.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = Api::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

#[cfg(test)]
mod tests {
    /// Every JSON API route of the public listener is in the document (the
    /// web client's files and the WebSocket upgrade are not JSON APIs).
    #[test]
    fn the_document_has_every_api_route() {
        let doc = super::document();
        let documented: std::collections::BTreeSet<&str> = doc.paths.paths.keys().map(String::as_str).collect();
        let source = [include_str!("http.rs"), include_str!("media.rs")].concat();
        let mut routes = std::collections::BTreeSet::new();
        for (at, _) in source.match_indices(".route(\"") {
            let rest = &source[at + 8..];
            let path = &rest[..rest.find('"').unwrap()];
            if path != "/v1/ws" && path != "/v1/openapi.json" {
                routes.insert(path);
            }
        }
        assert!(routes.len() >= 10, "{routes:?}");
        let missing: Vec<_> = routes.difference(&documented).collect();
        assert!(missing.is_empty(), "routes missing from the OpenAPI document: {missing:?}");
        let extra: Vec<_> = documented.difference(&routes).collect();
        assert!(extra.is_empty(), "documented but not routed: {extra:?}");
    }
}
