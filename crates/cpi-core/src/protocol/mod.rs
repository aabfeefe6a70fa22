//! The JSON wire protocol: request parsing, the closed set of calls, dispatch onto a
//! [`crate::Cpi`], and response shapes.
//!
//! Flow: [`Request::parse`] (bytes → method, arguments, context) →
//! [`Call::parse`] (method + arguments → a typed [`Call`]) → [`execute`] (a `Call`
//! on a backend → a JSON result in the shape of the request's API version) →
//! [`Response`].

mod call;
mod request;
mod response;

pub use call::{execute, Call};
pub use request::{Request, MAX_API_VERSION, MAX_REQUEST_BYTES};
pub use response::Response;

/// Handles one request end to end, given a way to build the backend from the context.
///
/// The binary uses this; it is here so that tests drive exactly the same path.
pub async fn handle<F, B>(input: &[u8], build_backend: F) -> Response
where
    F: FnOnce(&crate::CallContext) -> Result<B, crate::CpiError>,
    B: std::ops::Deref,
    B::Target: crate::Cpi,
{
    let request = match Request::parse(input) {
        Ok(r) => r,
        Err(e) => return Response::error(&e),
    };
    let call = match Call::parse(&request.method, &request.arguments) {
        Ok(c) => c,
        Err(e) => return Response::error(&e),
    };
    let ctx = request.context();
    let backend = match build_backend(&ctx) {
        Ok(b) => b,
        Err(e) => return Response::error(&e),
    };
    match execute(&*backend, &ctx, call).await {
        Ok(v) => Response::ok(v),
        Err(e) => Response::error(&e),
    }
}
