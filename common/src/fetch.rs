//! One bounded plain-HTTP GET (hyper's HTTP/1.1 client), for the small documents a proxy reads
//! at start or on a timer: a JWKS, an ECS task's metadata. Bounded in time and in size; anything
//! but a 2xx is an error.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("URI: {0}")]
    Uri(#[from] http::uri::InvalidUri),
    #[error("the URI has no host")]
    NoHost,
    #[error("request: {0}")]
    Request(#[from] http::Error),
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the fetch took longer than {0:?}")]
    Timeout(Duration),
    #[error("answered {0}")]
    Status(http::StatusCode),
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the body: {0}")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// GETs `uri` (`http://host[:port]/path`) within `timeout`, refusing a body over `max_bytes`
/// (by its declared length, or once that much has been read).
pub async fn get(uri: &str, timeout: Duration, max_bytes: usize) -> Result<Bytes, FetchError> {
    let uri: http::Uri = uri.parse()?;
    tokio::time::timeout(timeout, get_within(&uri, max_bytes))
        .await
        .map_err(|_| FetchError::Timeout(timeout))?
}

async fn get_within(uri: &http::Uri, max_bytes: usize) -> Result<Bytes, FetchError> {
    let authority = uri.authority().ok_or(FetchError::NoHost)?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port)).await.map_err(FetchError::Connect)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    let _conn = AbortOnDrop(tokio::spawn(conn));
    let req = http::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, authority.as_str().rsplit('@').next().unwrap_or_default())
        .body(http_body_util::Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        return Err(FetchError::Status(resp.status()));
    }
    let declared =
        resp.headers().get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    if declared.is_some_and(|len: usize| len > max_bytes) {
        return Err(FetchError::TooLarge(max_bytes));
    }
    let body = http_body_util::Limited::new(resp.into_body(), max_bytes).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            FetchError::TooLarge(max_bytes)
        } else {
            FetchError::Body(e)
        }
    })?;
    Ok(body.to_bytes())
}

/// Ends a spawned task when dropped (the connection, when its fetch ends or times out).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
