//! The web chat at `/`: web/dist (built by scripts/build-web.sh from web/) embedded in the
//! binary at compile time, so it works offline and needs no files beside the binary.

use rust_embed::RustEmbed;
use salvo::http::StatusCode;
use salvo::oapi::endpoint;
use salvo::prelude::*;
use salvo_serve_static::{render_embedded_file, static_embed};

use crate::error::ApiError;

#[derive(RustEmbed)]
#[folder = "../web/dist"]
#[allow_missing = true]
struct WebAssets;

/// Defence in depth beside DOMPurify: the page runs only its own script and talks only to
/// this server.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The web chat (HTML).
#[endpoint(tags("web"), status_codes(200, 404), responses((status_code = 200, description = "The web chat page", body = String, content_type = "text/html")))]
pub async fn index(req: &mut Request, res: &mut Response) {
    match WebAssets::get("index.html") {
        Some(file) => {
            res.add_header("content-security-policy", CONTENT_SECURITY_POLICY, true).ok();
            render_embedded_file(file, req, res, "text/html; charset=utf-8".parse().ok());
        }
        None => ApiError {
            message: "This binary was built without the web chat: run scripts/build-web.sh, then rebuild".into(),
            ..ApiError::from_status(StatusCode::NOT_FOUND)
        }
        .render(res),
    }
}

/// The page's assets (`/app.js`, `/style.css`, …); anything else is a JSON 404.
pub fn assets() -> Router {
    Router::with_path("{*path}").get(static_embed::<WebAssets>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_page_is_embedded() {
        // scripts/build-web.sh runs before every build in make run / make test.
        let page = WebAssets::get("index.html").expect("web/dist/index.html is embedded");
        let page = std::str::from_utf8(&page.data).unwrap();
        assert!(page.contains("/app.js") && page.contains("/style.css"));
        assert!(WebAssets::get("app.js").is_some() && WebAssets::get("style.css").is_some());
    }
}
