//! A stand-in HTTP API inside the tests (and the bench's sink): an HTTP/1.1
//! server with keep-alive that records every request (arrival time, method,
//! path, headers, body) and answers as a scripted handler says, so a test can
//! check every field a provider documents and answer as that provider does.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request as it arrived.
#[derive(Debug, Clone)]
pub struct Received {
    /// When its body was complete.
    pub at: Instant,
    /// `POST`, ...
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Received {
    /// The first header named `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The status.
    pub status: u16,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: String,
}

impl Reply {
    /// `status` with a JSON body.
    pub fn json(status: u16, body: serde_json::Value) -> Self {
        Self {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string(),
        }
    }

    /// The same answer with one more header.
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// The running stand-in; stops accepting when dropped.
pub struct ApiSink {
    port: u16,
    received: Arc<Mutex<Vec<Received>>>,
    handler: Arc<Mutex<Handler>>,
    accept: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for ApiSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiSink")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Drop for ApiSink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ApiSink {
    /// Starts on a free port of 127.0.0.1, answering as `handler` says.
    pub async fn start(
        handler: impl Fn(&Received) -> Reply + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Mutex<Handler>> = Arc::new(Mutex::new(Arc::new(handler)));
        let (r, h) = (received.clone(), handler.clone());
        let accept = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let _ = socket.set_nodelay(true);
                let (r, h) = (r.clone(), h.clone());
                tokio::spawn(async move {
                    let _ = serve(socket, r, h).await;
                });
            }
        });
        Ok(Self {
            port,
            received,
            handler,
            accept,
        })
    }

    /// A stand-in answering 200 `{"id": ...}` to everything, at once.
    pub async fn accepting() -> std::io::Result<Self> {
        Self::start(|_| Reply::json(200, serde_json::json!({"id": "ok"}))).await
    }

    /// Answers as `handler` says from now on.
    pub fn answer(&self, handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) {
        *self.handler.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(handler);
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:{port}`.
    pub fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many requests so far.
    pub fn count(&self) -> usize {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

async fn serve(
    socket: tokio::net::TcpStream,
    received: Arc<Mutex<Vec<Received>>>,
    handler: Arc<Mutex<Handler>>,
) -> std::io::Result<()> {
    let (read, mut write) = socket.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_owned();
        let path = parts.next().unwrap_or_default().to_owned();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if read.read_line(&mut h).await? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let get = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let mut body = Vec::new();
        if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            loop {
                let mut size = String::new();
                read.read_line(&mut size).await?;
                let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                read.read_exact(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(n) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
            body.resize(n, 0);
            read.read_exact(&mut body).await?;
        }
        let request = Received {
            at: Instant::now(),
            method,
            path,
            headers,
            body,
        };
        let handle = handler
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let reply = handle(&request);
        received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(request);
        let mut out = format!(
            "HTTP/1.1 {} X\r\ncontent-length: {}\r\n",
            reply.status,
            reply.body.len()
        );
        for (name, value) in &reply.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        out.push_str(&reply.body);
        write.write_all(out.as_bytes()).await?;
    }
}
